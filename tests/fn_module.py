"""A module whose forward is a function of (module, x), for small test networks written inline."""
import torch.nn as nn


class FnModule(nn.Module):
    def __init__(self, fn, **modules):
        super().__init__()
        self.fn = fn
        for k, v in modules.items():
            self.add_module(k, v)

    def forward(self, x):
        return self.fn(self, x)
