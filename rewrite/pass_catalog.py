"""The built-in passes' names and one-line descriptions, readable without importing torch (for `rewrite passes`).

tests/test_cli.py checks that this table matches the registered passes.
"""

BUILTIN_PASSES = {
    'cleanup': 'remove identities, inference-mode dropout and stochastic depth, zero addends and dead nodes',
    'fold_bn': 'fold BatchNorm and per-channel constant affines into the adjacent conv / conv_transpose / linear',
    'fuse_branches': 'merge parallel, concatenated and cascaded linear branches (RepVGG, ACNet, DBB, MobileOne, ExpandNets) into one conv, folding BatchNorm on the way',
    'remove_channels': 'physically remove provably dead channels (BN gamma 0, zero filters) across the whole graph',
    'remove_residual': "RM residual removal: widen each residual block's convs to carry its input and merge the shortcut, so the add disappears (exact, or refused with the reason)",
}
