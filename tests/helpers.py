"""Shared test helpers: inputs, and Cut-CE's tolerance rule against float64 truth."""

import torch


def make_inputs(B, T, V, dtype, device, seed=0, scale=2.0, prompt=None):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, T, V, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)
    ids = torch.randint(0, V, (B, T), generator=g).to(device)
    mask = torch.rand(B, T, generator=g) > 0.3
    if prompt is not None:
        mask[:, :prompt] = False
    return logits, ids, mask.to(device)


def assert_close_to_truth(impl, eager, truth, tol, what=""):
    """|impl - truth| <= |eager in the same dtype - truth| + tol, elementwise (NaN fails)."""
    impl, eager, truth = (t.detach().double().cpu() for t in (impl, eager, truth))
    assert not torch.isnan(impl).any(), f"{what}: NaN in result"
    err = (impl - truth).abs()
    allowed = (eager - truth).abs() + tol
    bad = err > allowed
    assert not bad.any(), (
        f"{what}: {int(bad.sum())} elements over tolerance; worst err {err.max().item():.3e} "
        f"allowed {allowed[bad].min().item():.3e}"
    )


def one_error_line(capsys, *text):
    """The CLI's stderr is exactly one `error: ...` line, holding each of `text`."""
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for t in text:
        assert t in err, err
    return err
