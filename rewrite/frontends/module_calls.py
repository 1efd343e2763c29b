"""Whether calling a module runs its class's own forward and nothing else.

Shortcuts that stand in for a module call (the tracing shortcuts, the meta shape pass's direct answers)
are only sound then: a hook (the module's own or a global one) runs code of its own around the call, and
a forward set on the instance (an adapter's injection, a test's patch) replaces the class's.
"""
from __future__ import annotations

import torch
from torch.nn.modules import module as module_globals

_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks")
_OWN_FORWARD_HOOKS = ("_forward_hooks", "_forward_pre_hooks")
_OWN_HOOKS = _OWN_FORWARD_HOOKS + ("_backward_hooks", "_backward_pre_hooks")


def global_hooks_set() -> bool:
    """Is a hook registered for every module (torch.nn.modules.module.register_module_forward_hook, ...)?"""
    for name in _GLOBAL_HOOKS:  # a loop, not any() over a generator: this runs for every module call imported
        if getattr(module_globals, name, None):
            return True
    return False


def runs_class_forward(module: torch.nn.Module) -> bool:
    """Does calling `module` run `type(module).forward` and nothing else?"""
    if "forward" in module.__dict__:
        return False
    for name in _OWN_HOOKS:
        if getattr(module, name, None):
            return False
    return not global_hooks_set()


def own_code(module: torch.nn.Module, global_hooks: bool = True, backward: bool = True,
             instance_forward: bool = True) -> str | None:
    """What runs when `module` is called besides its class's forward, said for a report; None if nothing.
    global_hooks=False leaves out the hooks registered for every module (they run on a rewritten model too);
    backward=False the backward hooks (they change no output); instance_forward=False a forward set on the
    instance (a torch.compile wrapper's, which runs the module it wraps)."""
    if instance_forward and "forward" in module.__dict__:
        return "a forward set on the instance replaces its class's"
    names = _OWN_HOOKS if backward else _OWN_FORWARD_HOOKS
    hooks = [name.strip("_").replace("_", " ") for name in names if getattr(module, name, None)]
    if hooks:
        return f"its {', '.join(hooks)} run code of their own around forward"
    if global_hooks and global_hooks_set():
        return "a global module hook runs code of its own around every call"
    return None


def compiled_original(module: torch.nn.Module) -> tuple[torch.nn.Module, str]:
    """The module a torch.compile wrapper (OptimizedModule) runs, and a note saying so; else (module, "").
    The wrapper's forward is set on its instance, so it cannot be captured itself; the module it wraps
    computes the same outputs, and its rewrite can be compiled again."""
    original = getattr(module, "_orig_mod", None)
    if type(module).__name__ == "OptimizedModule" and isinstance(original, torch.nn.Module):
        return original, "the torch.compile wrapper's module was rewritten (compile the result again if wanted)"
    return module, ""
