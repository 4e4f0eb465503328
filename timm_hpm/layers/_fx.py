"""Whether torch.fx is tracing: input checks that read tensor metadata are skipped then (the shapes are
symbolic), as they are under TorchScript; and whether torch.compile/torch.export is tracing or a torch.func
transform (vmap, grad) is running (eager-only bookkeeping that reads tensor values is skipped then)."""
import torch

try:  # torch >= 2.5 tells FX symbolic tracing from torch.export (and does not log a warning per call)
    from torch.fx._symbolic_trace import is_fx_symbolic_tracing as is_fx_tracing
except ImportError:  # pragma: no cover - older torch
    from torch.fx._symbolic_trace import is_fx_tracing

__all__ = ['is_fx_tracing', 'is_compiling', 'is_transformed']


def is_compiling() -> bool:
    """Whether torch.compile (dynamo) or torch.export is tracing the current call."""
    compiler = getattr(torch, 'compiler', None)
    if compiler is not None and hasattr(compiler, 'is_compiling'):
        return compiler.is_compiling()
    try:  # pragma: no cover - torch < 2.3
        from torch._dynamo import is_compiling as dynamo_is_compiling
    except ImportError:  # pragma: no cover
        return False
    return dynamo_is_compiling()


def is_transformed() -> bool:
    """Whether the current call runs inside a torch.func transform (``vmap``, ``grad``, ...), where a tensor's
    value cannot steer Python control flow."""
    functorch = getattr(torch._C, '_functorch', None)
    level = getattr(functorch, 'maybe_current_level', None)
    return level is not None and level() is not None
