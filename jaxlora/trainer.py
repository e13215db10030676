"""The resumable fine-tuning run behind `jaxlora finetune`: data, the jitted step, orbax checkpoints, resume.

runs/NAME/run.json        what the run was started with (and its model's layers: scanned or unrolled)
runs/NAME/checkpoints/    orbax CheckpointManager: trainable state, optimizer state, step, PRNG key, data position
runs/NAME/final/          LoRA: lora_config.json + adapters/ (orbax); --full: a whole jaxlora checkpoint
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from tqdm.auto import tqdm

from jaxlora import lora as lora_lib
from jaxlora.checkpoint import DTYPES, Model, load, load_adapters, save_adapters, save_param_group, write_config
from jaxlora.data import Batches, PreferencePairs, read_examples, read_pairs
from jaxlora.errors import UsageError
from jaxlora.losses import PREFERENCE_OBJECTIVES, PreferenceConfig
from jaxlora.quant import formats_of
from jaxlora.sharding import make_mesh, replicate, shard_batch
from jaxlora.stacking import layer_stacks, unstack_tree
from jaxlora.staging import check_destination, staged
from jaxlora.train import eval_loss, eval_preference, init_state, make_optimizer, make_train_step

# orbax writes a step into "<step>.orbax-checkpoint-tmp-<time>" and renames it when complete.
TMP_SUFFIX = ".orbax-checkpoint-tmp"


@dataclass
class RunOptions:
    data: str
    out: str
    eval_data: str | None = None
    steps: int = 100
    batch_size: int = 4
    grad_accum: int = 1
    seq_len: int = 256
    pack: bool = True
    learning_rate: float = 2e-4
    warmup_steps: int = 10
    weight_decay: float = 0.0
    clip_norm: float = 1.0
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = lora_lib.DEFAULT_TARGETS
    full: bool = False
    remat: bool = False
    dtype: str | None = None
    seed: int = 0
    save_every: int = 50
    keep: int = 3
    eval_every: int = 0
    resume: bool = False
    init_lora: str | None = None  # start from these adapters (jaxlora final/ or a PEFT folder)
    mesh: str | None = None  # e.g. "data=2,tensor=4": base params sharded, adapters replicated, batch over data
    quantize: str | None = None  # "int8" / "int4[:GROUP]": quantize the frozen base on load (QLoRA)
    attention: str = "auto"  # attention implementation, see jaxlora.attention ("chunked" for long sequences)
    moe: str = "auto"  # mixture-of-experts dispatch, see jaxlora.moe
    scan_layers: str = "auto"  # "on", "off", "auto": layers as lax.scans over stacked params (jaxlora.stacking)
    objective: str = "sft"  # or a preference objective on pairs: dpo, ipo, orpo, simpo (jaxlora.losses)
    beta: float = 0.1
    label_smoothing: float = 0.0  # dpo, simpo
    simpo_gamma: float = 0.5

    @property
    def preference(self) -> PreferenceConfig | None:
        if self.objective == "sft":
            return None
        return PreferenceConfig(self.objective, self.beta, self.label_smoothing, self.simpo_gamma)

    def check(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "save_every", "keep", "rank"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.learning_rate <= 0 or not math.isfinite(self.learning_rate):
            raise UsageError(f"--lr must be a positive number, got {self.learning_rate}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise UsageError(f"unknown --dtype {self.dtype!r}")
        if self.objective not in ("sft", *PREFERENCE_OBJECTIVES):
            raise UsageError(f"unknown --objective {self.objective!r}; choose sft, {', '.join(PREFERENCE_OBJECTIVES)}")
        if not (self.beta > 0 and math.isfinite(self.beta)):
            raise UsageError(f"--beta must be a positive number, got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise UsageError(f"--label-smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing and self.objective not in ("dpo", "simpo"):
            raise UsageError(f"--label-smoothing applies to dpo and simpo, not {self.objective}")
        if not math.isfinite(self.simpo_gamma):
            raise UsageError(f"--simpo-gamma must be a number, got {self.simpo_gamma}")


def check_run_folder(run_dir: Path) -> None:
    """--out must be a run folder of ours, or new, or empty: a run writes run.json, checkpoints/ and final/ there."""
    check_destination(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise UsageError(f"--out {run_dir} is a file, not a folder")
    if run_dir.is_dir() and any(run_dir.iterdir()):
        ours = (run_dir / "run.json").is_file() or (run_dir / "checkpoints").is_dir()
        if not ours:
            raise UsageError(f"--out {run_dir} holds files that are not a jaxlora run: choose a new or empty folder")


def complete_steps(run_dir: Path) -> list[int]:
    """The steps with a complete checkpoint in the run folder. The temporary folder of an interrupted save is ours
    and is removed: it is not a checkpoint."""
    folder = run_dir / "checkpoints"
    if not folder.is_dir():
        return []
    steps = []
    for entry in folder.iterdir():
        if TMP_SUFFIX in entry.name:
            shutil.rmtree(entry, ignore_errors=True)
        elif entry.name.isdigit() and entry.is_dir():
            steps.append(int(entry.name))
    return sorted(steps)


def _manager(run_dir: Path, keep: int):
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
    return ocp.CheckpointManager((run_dir / "checkpoints").absolute(), options=options)


def _as_saveable(state):
    """The train state with its PRNG key as raw data (orbax stores arrays, not typed keys)."""
    return state.replace(key=jax.random.key_data(state.key))


def saved_layers(run_dir: Path) -> str:
    """The layout ("scanned" or "unrolled") a run's model had, as its run.json says (runs from before scanned
    layers, or without a readable run.json, were unrolled)."""
    try:
        layers = json.loads((run_dir / "run.json").read_text()).get("layers", "unrolled")
    except (OSError, ValueError, AttributeError):
        return "unrolled"
    return "scanned" if layers == "scanned" else "unrolled"


def run(checkpoint: str, options: RunOptions, log=print) -> Path:
    """Train; returns the final folder."""
    options.check()
    # Everything that can be refused without the model is checked before loading it (seconds on a large one).
    run_dir = Path(options.out)
    check_run_folder(run_dir)
    complete = complete_steps(run_dir)
    if complete and not options.resume:
        raise UsageError(f"{run_dir} already has checkpoints: pass --resume to continue it or choose another --out")
    if options.resume and not complete:
        if not (run_dir / "checkpoints").is_dir():
            raise UsageError(f"nothing to resume: {run_dir} has no checkpoints (drop --resume to start a new run)")
        log(f"{run_dir} has no complete checkpoint (its first save was interrupted): starting from step 0")
    manager_exists = bool(complete)
    preference = options.preference
    read = read_examples if preference is None else read_pairs
    examples = read(options.data)
    eval_examples = read(options.eval_data) if options.eval_data else None

    mesh = make_mesh(options.mesh) if options.mesh else None
    scan_layers = options.scan_layers
    if manager_exists:  # the saved state is laid out as the run's model was: resume in that layout
        scan_layers = "on" if saved_layers(run_dir) == "scanned" else "off"
        if options.scan_layers not in ("auto", scan_layers):
            log(f"resuming with the run's {saved_layers(run_dir)} layers (its checkpoints are laid out so)")
    model: Model = load(
        checkpoint,
        mesh=mesh,
        attention=options.attention,
        quantize=options.quantize,
        moe=options.moe,
        scan_layers=scan_layers,
    )
    if options.full and formats_of(model.params):
        raise UsageError(
            "--full trains every weight, which needs a float checkpoint: quantized weights train only LoRA"
        )
    if model.tokenizer is None:
        raise UsageError(f"{checkpoint} has no tokenizer to read the data with")
    if preference is None:
        train = Batches(examples, model.tokenizer, options.seq_len, pack=options.pack, seed=options.seed)
    else:
        train = PreferencePairs(examples, model.tokenizer, options.seq_len, seed=options.seed)
    evals = None
    if eval_examples is not None:
        if preference is None:
            evals = Batches(eval_examples, model.tokenizer, options.seq_len, pack=options.pack)
        else:
            evals = PreferencePairs(eval_examples, model.tokenizer, options.seq_len)

    key = jax.random.key(options.seed)
    if options.full:
        trainable = model.params
    elif options.init_lora:
        trainable = load_adapters(options.init_lora, model.config)
    else:
        trainable = lora_lib.init(
            model.config, key, rank=options.rank, alpha=options.alpha, targets=options.targets, dropout=options.dropout
        )
    if mesh is not None and not options.full:
        trainable = replicate(trainable, mesh)
    place = (lambda batch: batch) if mesh is None else (lambda batch: shard_batch(batch, mesh))  # noqa: E731
    optimizer = make_optimizer(
        options.learning_rate,
        options.steps,
        warmup_steps=options.warmup_steps,
        weight_decay=options.weight_decay,
        clip_norm=options.clip_norm,
    )
    dtype = DTYPES[options.dtype] if options.dtype else None
    train_step = make_train_step(
        model.params,
        model.config,
        optimizer,
        full=options.full,
        remat=options.remat,
        dtype=dtype,
        preference=preference,
    )
    state = init_state(trainable, optimizer, key)
    position = 0
    run_dir.mkdir(parents=True, exist_ok=True)
    layers = "scanned" if model.config.scan_layers else "unrolled"
    meta = {"checkpoint": str(checkpoint), **asdict(options), "layers": layers}
    (run_dir / "run.json").write_text(json.dumps(meta, indent=2))
    manager = _manager(run_dir, options.keep)
    if manager_exists:
        step = manager.latest_step()
        abstract = _as_saveable(state)
        restored = manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())
        )
        state = restored["state"].replace(key=jax.random.wrap_key_data(restored["state"].key))
        position = int(restored["meta"]["position"])
        log(f"resumed from step {step} (data row {position})")

    rows_per_step = options.batch_size * options.grad_accum
    start_step = int(state.step)
    bar = tqdm(total=options.steps, initial=start_step, desc="finetune", unit="step", file=sys.stderr)
    started, tokens_seen = time.perf_counter(), 0.0
    try:
        for step in range(start_step, options.steps):
            batch = place(train.batch(position, options.batch_size, options.grad_accum))
            state, metrics = train_step(state, batch)
            position += rows_per_step
            loss, tokens = float(metrics["loss"]), float(metrics["tokens"])
            tokens_seen += tokens
            bar.update()
            shown = {"loss": f"{loss:.4f}"}
            if preference is not None:
                shown |= {
                    "margin": f"{float(metrics['reward_margin']):.3f}",
                    "acc": f"{float(metrics['accuracy']):.2f}",
                }
            bar.set_postfix(**shown, tok_s=f"{tokens_seen / (time.perf_counter() - started):.0f}")
            done = step + 1
            if evals is not None and options.eval_every and done % options.eval_every == 0:
                lora = None if options.full else state.trainable
                params = state.trainable if options.full else model.params
                rows = (evals.rows(i, 1) for i in range(len(evals)))
                if preference is None:
                    result = eval_loss(params, model.config, rows, lora, dtype)
                    log(f"step {done}: eval loss {result['loss']:.4f}, perplexity {result['perplexity']:.2f}")
                else:
                    result = eval_preference(preference, params, model.config, rows, lora, model.params, dtype)
                    log(
                        f"step {done}: eval loss {result['loss']:.4f}, reward margin {result['reward_margin']:.4f},"
                        f" accuracy {result['accuracy']:.3f}"
                    )
            if done % options.save_every == 0 or done == options.steps:
                manager.save(
                    done,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardSave(_as_saveable(state)), meta=ocp.args.JsonSave({"position": position})
                    ),
                )
                manager.wait_until_finished()
                log(f"saved checkpoint at step {done}")
    except KeyboardInterrupt:
        manager.close()  # a save in flight completes (a whole step) instead of leaving its temp folder
        raise
    bar.close()
    final = run_dir / "final"
    if options.full:
        with staged(final, force=True) as staging:
            dtype_name = str(np.dtype(jax.tree.leaves(state.trainable)[0].dtype))
            write_config(staging, model.config, dtype=dtype_name, source=str(checkpoint))
            per_layer = state.trainable
            if model.config.scan_layers:
                per_layer = unstack_tree(per_layer, layer_stacks(model.config))
            for group, subtree in per_layer.items():
                save_param_group(staging, group, subtree)
            if model.path is not None and (model.path / "tokenizer").is_dir():
                shutil.copytree(model.path / "tokenizer", staging / "tokenizer")
    else:
        save_adapters(state.trainable, final, str(checkpoint), force=True)
    log(f"wrote {final}")
    return final
