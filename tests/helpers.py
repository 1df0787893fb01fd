"""Shared test helpers: inputs, Cut-CE's tolerance rule against float64 truth, the CLI's one error
line, and a model written into the hub cache."""

from pathlib import Path

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


def put_snapshot(hub: Path, repo: str, commit: str, model, tok, *refs: str) -> Path:
    """A model as the hub cache holds it: models--org--name/snapshots/<commit>/ and refs/<ref>
    (what a download leaves, and what an offline `from_pretrained(repo)` reads); the snapshot."""
    root = hub / ("models--" + repo.replace("/", "--"))
    snap = root / "snapshots" / commit
    model.save_pretrained(snap)
    tok.save_pretrained(snap)
    (root / "refs").mkdir(parents=True, exist_ok=True)
    for ref in refs:
        (root / "refs" / ref).write_text(commit)
    return snap
