"""The trainer's TRL per-token metrics (entropy, logits/chosen, logits/rejected,
mean_token_accuracy), computed without logits, against the model's full logits in float64."""

import copy

import pytest
import torch
from helpers import assert_close_to_truth
from test_train import ROWS, make_trainer

from fused_dpo.train.token_metrics import KEYS, averages

pytestmark = pytest.mark.usefixtures("one_thread")


@torch.no_grad()
def trl_metrics(model, batches, dtype) -> dict[str, torch.Tensor]:
    """TRL 1.16's definitions from full logits in `dtype`, token-weighted over all `batches`
    (each a [chosen; rejected] batch): per-token entropy over every response token, the mean
    logit over the chosen / rejected response tokens, top-1 hits over the chosen ones."""
    model = copy.deepcopy(model).to(dtype)
    sums = {k: torch.zeros(2, dtype=torch.float64) for k in KEYS}
    for batch in batches:
        B = batch["input_ids"].shape[0] // 2
        z = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        labels, mask = batch["input_ids"][:, 1:], batch["response_mask"][:, 1:]
        logp = z.log_softmax(-1)
        per_token = {"entropy": -(logp.exp() * logp).sum(-1), "mean_logits": z.mean(-1),
                     "is_top1": (z.argmax(-1) == labels).to(dtype)}
        chosen = torch.arange(2 * B)[:, None] < B
        for key, stat, rows in (("entropy", "entropy", torch.ones_like(chosen)),
                                ("logits/chosen", "mean_logits", chosen),
                                ("logits/rejected", "mean_logits", ~chosen),
                                ("mean_token_accuracy", "is_top1", chosen)):
            sel = mask & rows
            sums[key] += torch.stack([per_token[stat][sel].sum().double(), sel.sum().double()])
    return {k: torch.tensor(x / n if n > 0 else 0.0, dtype=torch.float64) for k, (x, n) in
            ((k, v.tolist()) for k, v in sums.items())}


def check(logged: dict, model, batches, prefix=""):
    truth = trl_metrics(model, batches, torch.float64)
    eager = trl_metrics(model, batches, torch.float32)
    for k in KEYS:
        assert_close_to_truth(torch.tensor(logged[prefix + k]), eager[k], truth[k], 1e-6, prefix + k)


@pytest.mark.parametrize("path", ["hidden", "logits"])
def test_logged_token_metrics_equal_full_logits_in_float64(tmp_path, path):
    # Two micro-batches per step: the metrics are token-weighted over both. A few quick steps
    # first, so that some chosen tokens are top-1 (none are at initialisation).
    t = make_trainer(tmp_path, batch_size=4, gradient_accumulation_steps=2, learning_rate=3e-3,
                     max_steps=20, eval_rows=ROWS[200:210])
    if path == "logits":
        t.policy_logps.fused = False  # what a head that is not a plain Linear gets
    assert t.policy_logps.fused == (path == "hidden")
    for _ in range(8):
        t.train_step()
    position, perm = t.position, t._perm
    batches = [t._batch(t.train_data, t._pair_indices(4)) for _ in range(2)]
    t.position, t._perm = position, perm
    before = copy.deepcopy(t.model)  # the weights whose forward the step's metrics describe
    m = t.train_step()
    check(m, before, batches)
    assert m["mean_token_accuracy"] > 0.1  # the check above is not only 0 == 0

    ev = t.evaluate()
    n, bs = len(t.eval_data.pairs), t.config.batch_size
    eval_batches = [t._batch(t.eval_data, list(range(s, min(s + bs, n)))) for s in range(0, n, bs)]
    check(ev, t.model, eval_batches, "eval/")


def test_no_tokens_reads_zero():
    assert averages(torch.zeros(len(KEYS), 2), "eval/") == {"eval/" + k: 0.0 for k in KEYS}


def test_wpo_weights_from_the_same_pass(tmp_path):
    """use_weighting (WPO): at step 0 (policy == reference) every pair's loss is log 2 times its
    detached weight w_c * w_r, w = exp((sum log p - sum log sum p^2) / n) per response, here
    from the model's full logits in float64."""
    t = make_trainer(tmp_path, batch_size=4, max_steps=3, use_weighting=True)
    assert "log_sum_sq_probs" in t.policy_logps.stats
    position, perm = t.position, t._perm
    batch = t._batch(t.train_data, t._pair_indices(4))
    t.position, t._perm = position, perm
    with torch.no_grad():
        model = copy.deepcopy(t.model).double()
        z = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        labels, mask = batch["input_ids"][:, 1:], batch["response_mask"][:, 1:].double()
        logp = z.log_softmax(-1)
        tok = logp.gather(-1, labels[..., None]).squeeze(-1)
        lq = torch.logsumexp(2 * logp, -1)
        n = mask.sum(-1)
        w = torch.exp(((tok - lq) * mask).sum(-1) / n.clamp_min(1))
        want = (torch.log(torch.tensor(2.0, dtype=torch.float64)) * w[:4] * w[4:]).mean()
    m = t.train_step()
    assert abs(m["loss"] - want.item()) < 1e-5 * max(1.0, want.item()), (m["loss"], want.item())


def test_f_divergence_option_reaches_the_loss(tmp_path):
    t = make_trainer(tmp_path, batch_size=4, max_steps=3, f_divergence_type="js_divergence")
    m = t.train_step()
    assert abs(m["loss"] - 0.6931471805599453) < 1e-6  # every f-divergence score is 0 at step 0
    assert t._loss_kwargs(None)["f_divergence_type"] == "js_divergence"
