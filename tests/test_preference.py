"""Preference tuning: each objective's loss and gradient equal TRL's on the same tiny models and batch; a tiny
preference set is learned."""

import copy
import os
from collections import defaultdict
from types import SimpleNamespace

import jax
import numpy as np
import pytest
import torch
from conftest import TINY_CONFIGS, hf_model, random_ids, save_hf

import jaxlora
from jaxlora import lora
from jaxlora.losses import PreferenceConfig
from jaxlora.train import init_state, make_optimizer, make_train_step

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
PAIRS, SEQ = 3, 16
PROMPTS, CHOSEN, REJECTED = (5, 3, 7), (6, 9, 4), (8, 2, 5)  # tokens per pair


@pytest.fixture(scope="module")
def policy_and_reference(tmp_path_factory):
    """Two tiny llamas with different random weights: the policy being trained and the frozen reference."""
    root = tmp_path_factory.mktemp("preference")
    models = {}
    for name, seed in (("policy", 1), ("reference", 2)):
        torch_model = hf_model(TINY_CONFIGS["llama-gqa"], seed=seed)
        save_hf(torch_model, root / name)
        jaxlora.convert(str(root / name), root / f"{name}-jax")
        models[name] = (torch_model, jaxlora.load(root / f"{name}-jax"))
    return models


def pair_batch(vocab: int) -> dict:
    """[2 * pairs, seq]: chosen rows first, then rejected; right-padded; loss on the responses (TRL's layout)."""
    ids = np.zeros((2 * PAIRS, SEQ), np.int32)
    mask = np.zeros_like(ids)
    response = np.zeros_like(ids)
    for i in range(PAIRS):
        prompt = random_ids((PROMPTS[i],), vocab, seed=20 + i)
        for row, n in ((i, CHOSEN[i]), (PAIRS + i, REJECTED[i])):
            answer = random_ids((n,), vocab, seed=40 + row)
            ids[row, : PROMPTS[i] + n] = np.concatenate([prompt, answer])
            mask[row, : PROMPTS[i] + n] = 1
            response[row, PROMPTS[i] : PROMPTS[i] + n] = 1
    return {"input_ids": ids, "attention_mask": mask, "loss_mask": response}


def trl_dpo_loss(policy, reference, batch, loss_type: str, beta: float):
    """TRL's DPOTrainer._compute_loss, run on a stand-in trainer holding only what that method reads."""
    from trl import DPOTrainer
    from trl.trainer.utils import add_fused_lm_head

    policy, reference = copy.deepcopy(policy).train(), copy.deepcopy(reference).eval()
    add_fused_lm_head(policy, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    add_fused_lm_head(reference)
    identity = lambda x: x  # noqa: E731
    trainer = SimpleNamespace(
        model=policy,
        ref_model=reference,
        accelerator=SimpleNamespace(device="cpu", gather_for_metrics=identity, gather=identity, unwrap_model=identity),
        args=SimpleNamespace(gradient_checkpointing_kwargs=None),
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=False,
        f_divergence_type="reverse_kl",
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=0.0,
        use_weighting=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {
        "input_ids": torch.tensor(batch["input_ids"], dtype=torch.long),
        "attention_mask": torch.tensor(batch["attention_mask"], dtype=torch.long),
        "completion_mask": torch.tensor(batch["loss_mask"], dtype=torch.long),
    }
    loss = DPOTrainer._compute_loss(trainer, policy, inputs, return_outputs=False)
    return loss, policy, trainer._metrics["train"]


def trl_reference_free_loss(policy, batch, objective: str, beta: float, label_smoothing: float, gamma: float):
    """TRL's ORPO (odds_ratio_loss plus its chosen NLL, as ORPOTrainer.get_batch_loss_metrics assembles them) or
    SimPO (CPOTrainer.cpo_loss with loss_type="simpo", cpo_alpha 0) from TRL's own per-sequence mean log-probs."""
    from trl.experimental.cpo import CPOTrainer
    from trl.experimental.orpo import ORPOTrainer

    policy = copy.deepcopy(policy).train()
    ids = torch.tensor(batch["input_ids"], dtype=torch.long)
    mask = torch.tensor(batch["attention_mask"], dtype=torch.long)
    logits = policy(input_ids=ids, attention_mask=mask).logits
    labels = torch.where(torch.tensor(batch["loss_mask"]) == 1, ids, -100)
    logps = ORPOTrainer.get_batch_logps(logits, labels, average_log_prob=True)
    chosen, rejected = logps[:PAIRS], logps[PAIRS:]
    stand_in = SimpleNamespace(
        beta=beta,
        label_smoothing=label_smoothing,
        loss_type="simpo",
        simpo_gamma=gamma,
        alpha=0.0,
        accelerator=SimpleNamespace(device="cpu"),
    )
    if objective == "simpo":
        losses, chosen_rewards, rejected_rewards = CPOTrainer.cpo_loss(stand_in, chosen, rejected)
        return losses.mean(), policy, chosen_rewards - rejected_rewards
    losses, chosen_rewards, rejected_rewards, _, _ = ORPOTrainer.odds_ratio_loss(stand_in, chosen, rejected)
    # ORPO's NLL: the chosen sequences, prompt and response, token mean (labels = the attended input ids).
    nll_labels = torch.where(mask[:PAIRS] == 1, ids[:PAIRS], -100)[:, 1:]
    nll = torch.nn.functional.cross_entropy(
        logits[:PAIRS, :-1].reshape(-1, logits.shape[-1]), nll_labels.reshape(-1), ignore_index=-100
    )
    return nll - losses.mean(), policy, chosen_rewards - rejected_rewards


def jaxlora_first_step(models, batch, preference: PreferenceConfig) -> dict:
    """The metrics of one full fine-tuning step of the policy against the reference (computed before the update)."""
    policy, reference = models["policy"][1], models["reference"][1]
    optimizer = make_optimizer(1e-3, 10)
    step = make_train_step(reference.params, policy.config, optimizer, full=True, preference=preference)
    trainable = jax.tree.map(lambda x: x.copy(), policy.params)
    _, metrics = step(init_state(trainable, optimizer, jax.random.key(0)), jax.tree.map(lambda x: x[None], batch))
    return {k: float(v) for k, v in metrics.items()}


def grad_norm(model) -> float:
    return float(torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters() if p.grad is not None)))


@pytest.mark.parametrize(
    "objective, beta, label_smoothing",
    [
        ("dpo", 0.1, 0.0),
        ("dpo", 0.5, 0.0),
        ("ipo", 0.1, 0.0),
        ("orpo", 0.1, 0.0),
        ("simpo", 2.0, 0.0),
        ("simpo", 2.0, 0.2),
    ],
)
def test_loss_and_gradient_equal_trl(policy_and_reference, objective, beta, label_smoothing):
    """The step's loss within 1e-5 of TRL's on the same weights and batch, and the gradient's global norm (every
    param of the policy) within 1e-4 of autograd through TRL's loss."""
    models = policy_and_reference
    batch = pair_batch(models["policy"][1].config.vocab_size)
    preference = PreferenceConfig(objective, beta=beta, label_smoothing=label_smoothing, simpo_gamma=0.5)
    ours = jaxlora_first_step(models, batch, preference)
    if objective in ("dpo", "ipo"):
        loss, policy, logged = trl_dpo_loss(
            models["policy"][0], models["reference"][0], batch, "sigmoid" if objective == "dpo" else "ipo", beta
        )
        assert ours["reward_margin"] == pytest.approx(logged["rewards/margins"][0], rel=1e-4)
        assert ours["accuracy"] == pytest.approx(logged["rewards/accuracies"][0])
        assert ours["chosen_logps"] == pytest.approx(logged["logps/chosen"][0], rel=1e-5)
        assert ours["rejected_logps"] == pytest.approx(logged["logps/rejected"][0], rel=1e-5)
    else:
        loss, policy, margins = trl_reference_free_loss(
            models["policy"][0], batch, objective, beta, label_smoothing, 0.5
        )
        assert ours["reward_margin"] == pytest.approx(float(margins.mean()), rel=1e-4)
    assert ours["loss"] == pytest.approx(loss.item(), rel=1e-5)
    loss.backward()
    assert ours["grad_norm"] == pytest.approx(grad_norm(policy), rel=1e-4)
    assert ours["tokens"] == sum(CHOSEN) + sum(REJECTED)


def test_label_smoothing_is_conservative_dpo(policy_and_reference):
    """DPO with label smoothing eps is (1 - eps) DPO on the pair plus eps DPO on the swapped pair (cDPO): checked
    through the step itself, swapping chosen and rejected rows."""
    models = policy_and_reference
    batch = pair_batch(models["policy"][1].config.vocab_size)
    swapped = {k: np.concatenate([v[PAIRS:], v[:PAIRS]]) for k, v in batch.items()}
    plain = jaxlora_first_step(models, batch, PreferenceConfig("dpo", beta=0.5))["loss"]
    flipped = jaxlora_first_step(models, swapped, PreferenceConfig("dpo", beta=0.5))["loss"]
    smoothed = jaxlora_first_step(models, batch, PreferenceConfig("dpo", beta=0.5, label_smoothing=0.2))["loss"]
    assert smoothed == pytest.approx(0.8 * plain + 0.2 * flipped, rel=1e-5)
    assert abs(plain - flipped) > 1e-3


@pytest.mark.parametrize("objective", ["dpo", "simpo"])
def test_a_tiny_preference_set_is_learned(policy_and_reference, objective):
    """LoRA on the policy: within a few dozen steps the reward margin rises and every pair's chosen response wins;
    the reference (the base without adapters) never moves."""
    models = policy_and_reference
    model = models["policy"][1]
    batch = jax.tree.map(lambda x: x[None], pair_batch(model.config.vocab_size))
    adapters = lora.init(model.config, jax.random.key(0), rank=8, targets=("q_proj", "v_proj", "o_proj", "up_proj"))
    optimizer = make_optimizer(2e-2, 40, warmup_steps=2)
    preference = PreferenceConfig(objective, beta=0.5 if objective == "dpo" else 2.0)
    step = make_train_step(model.params, model.config, optimizer, preference=preference)
    state = init_state(adapters, optimizer, jax.random.key(1))
    history = []
    for _ in range(40):
        state, metrics = step(state, batch)
        history.append({k: float(v) for k, v in metrics.items()})
    assert history[0]["accuracy"] < 1.0  # not already solved by the random weights
    assert history[-1]["accuracy"] == 1.0
    assert history[-1]["reward_margin"] > history[0]["reward_margin"] + 1.0
    assert history[-1]["loss"] < history[0]["loss"]
