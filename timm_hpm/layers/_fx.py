"""Whether torch.fx is tracing: input checks that read tensor metadata are skipped then (the shapes are
symbolic), as they are under TorchScript."""
try:  # torch >= 2.5 tells FX symbolic tracing from torch.export (and does not log a warning per call)
    from torch.fx._symbolic_trace import is_fx_symbolic_tracing as is_fx_tracing
except ImportError:  # pragma: no cover - older torch
    from torch.fx._symbolic_trace import is_fx_tracing

__all__ = ['is_fx_tracing']
