"""Runs in a subprocess with fake CPU devices (set before JAX starts): sharded load, forward and generate.

python sharding_worker.py meshes CKPT IDS.npy          # 8 devices, one process: prints a JSON report
python sharding_worker.py process CKPT IDS.npy I PORT  # one of two jax.distributed processes, 4 devices each
python sharding_worker.py experts CKPT                 # a mixture of experts over the `expert` axis: a JSON report
python sharding_worker.py scanned CKPT                 # scanned layers on two meshes vs one unrolled device
python sharding_worker.py engine CKPT                  # the serving engine on two meshes vs one device
"""

import json
import sys

import jax
import numpy as np


def report_mesh(model_path, ids, spec, reference_logits, reference_tokens):
    import jaxlora
    from jaxlora.sharding import make_mesh

    mesh = make_mesh(spec)
    model = jaxlora.load(model_path, mesh=mesh)
    leaves, _ = jax.tree_util.tree_flatten_with_path(model.params)
    specs = {"/".join(k.key for k in path): str(leaf.sharding.spec) for path, leaf in leaves}
    logits = np.asarray(jax.jit(jaxlora.forward, static_argnums=1)(model.params, model.config, ids))
    tokens = jaxlora.generate(model.params, model.config, ids, max_new_tokens=12).tokens
    # The chunked core's loops over blocks run on sharded heads too.
    chunked = model.config.with_attention("chunked")
    chunked_logits = np.asarray(jax.jit(jaxlora.forward, static_argnums=1)(model.params, chunked, ids))
    q = model.params["layers_0"]["attn"]["q_proj"]["kernel"]
    per_device = {int(s.data.nbytes) for s in q.addressable_shards}
    return {
        "mesh": dict(mesh.shape),
        "max_logit_diff": float(np.abs(logits - reference_logits).max()),
        "max_chunked_logit_diff": float(np.abs(chunked_logits - reference_logits).max()),
        "tokens_equal": bool((tokens == reference_tokens).all()),
        "specs": specs,
        "q_proj_spec": str(q.sharding.spec),
        "q_proj_bytes_per_device": sorted(per_device),
        "q_proj_bytes": int(q.nbytes),
        "q_proj_shard_shapes": sorted({tuple(s.data.shape) for s in q.addressable_shards}),
    }


def quantized(model_path, float_path, ids):
    """int4 weights restored straight into their shardings, and quantized on load onto a mesh: one device's logits."""
    import jaxlora
    from jaxlora.sharding import make_mesh

    single = jaxlora.load(model_path)
    reference = np.asarray(jaxlora.forward(single.params, single.config, ids))
    tokens = jaxlora.generate(single.params, single.config, ids, max_new_tokens=8).tokens
    report = {}
    for spec in ("data=2,fsdp=2,tensor=2", "tensor=8"):
        mesh = make_mesh(spec)
        loads = {
            "stored": lambda mesh=mesh: jaxlora.load(model_path, mesh=mesh),
            "on_load": lambda mesh=mesh: jaxlora.load(float_path, mesh=mesh, quantize="int4:16"),
        }
        for how, load in loads.items():
            model = load()
            q = model.params["layers_0"]["attn"]["q_proj"]["kernel"]
            logits = np.asarray(jax.jit(jaxlora.forward, static_argnums=1)(model.params, model.config, ids))
            report[f"{spec} {how}"] = {
                "max_logit_diff": float(np.abs(logits - reference).max()),
                "tokens_equal": bool(
                    (jaxlora.generate(model.params, model.config, ids, max_new_tokens=8).tokens == tokens).all()
                ),
                "q_proj": {name: str(part.sharding.spec) for name, part in q.items()},
            }
    return report


def meshes(model_path, ids_path, uneven_path, quantized_path):
    import jaxlora

    ids = np.load(ids_path)
    single = jaxlora.load(model_path)  # on device 0
    reference_logits = np.asarray(jaxlora.forward(single.params, single.config, ids))
    reference_tokens = jaxlora.generate(single.params, single.config, ids, max_new_tokens=12).tokens
    reports = [
        report_mesh(model_path, ids, spec, reference_logits, reference_tokens)
        for spec in ("data=8", "tensor=8", "data=2,tensor=4", "data=2,fsdp=2,tensor=2")
    ]
    # SmolLM2's shape: 9 query heads and 3 kv heads over 4 tensor devices cannot split; it must still run.
    uneven = jaxlora.load(uneven_path)
    uneven_ids = ids[:, :7]
    reference = jaxlora.generate(uneven.params, uneven.config, uneven_ids, max_new_tokens=8).tokens
    from jaxlora.sharding import make_mesh

    sharded = jaxlora.load(uneven_path, mesh=make_mesh("data=2,tensor=4"))
    tokens = jaxlora.generate(sharded.params, sharded.config, uneven_ids, max_new_tokens=8).tokens
    q = sharded.params["layers_0"]["attn"]["q_proj"]["kernel"]
    mlp = sharded.params["layers_0"]["mlp"]["up_proj"]["kernel"]
    uneven_report = {
        "tokens_equal": bool((tokens == reference).all()),
        "q_proj_spec": str(q.sharding.spec),
        "up_proj_spec": str(mlp.sharding.spec),
    }
    print(
        json.dumps(
            {
                "devices": jax.device_count(),
                "meshes": reports,
                "uneven": uneven_report,
                "lora_step": lora_step(model_path, ids),
                "quantized": quantized(quantized_path, model_path, ids),
            }
        )
    )


def lora_step(model_path, ids):
    """Two LoRA train steps on a data=2 x tensor=4 mesh give the single-device adapters."""
    import jaxlora
    from jaxlora import lora
    from jaxlora.sharding import make_mesh, replicate, shard_batch
    from jaxlora.train import init_state, make_optimizer, make_train_step

    batch = {"input_ids": ids[None], "attention_mask": np.ones_like(ids)[None], "loss_mask": np.ones_like(ids)[None]}
    results = []
    for mesh in (None, make_mesh("data=2,tensor=4")):
        model = jaxlora.load(model_path, mesh=mesh)
        adapters = lora.init(model.config, jax.random.key(0), rank=4, targets=("q_proj", "v_proj", "down_proj"))
        optimizer = make_optimizer(1e-2, 10)
        state = init_state(adapters if mesh is None else replicate(adapters, mesh), optimizer, jax.random.key(1))
        step = make_train_step(model.params, model.config, optimizer)
        placed = batch if mesh is None else shard_batch(batch, mesh)
        for _ in range(2):
            state, metrics = step(state, placed)
        results.append((jax.tree.map(np.asarray, state.trainable.weights), float(metrics["loss"])))
    (single, single_loss), (sharded, sharded_loss) = results
    diff = max(
        float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(sharded), strict=True)
    )
    return {"max_adapter_diff": diff, "loss_diff": abs(single_loss - sharded_loss)}


def experts(model_path):
    """Expert parallelism: per mesh and dispatch, logits, greedy tokens and full-fine-tuning gradients vs one device."""
    import jaxlora
    from jaxlora.sharding import make_mesh

    ids = np.random.default_rng(0).integers(0, 97, size=(4, 13)).astype(np.int32)

    def loss(params, config):
        logprobs = jax.nn.log_softmax(jaxlora.forward(params, config, ids)[:, :-1])
        return -jax.numpy.take_along_axis(logprobs, ids[:, 1:, None], axis=-1).mean()

    def results(model):
        logits = jax.jit(jaxlora.forward, static_argnums=1)(model.params, model.config, ids)
        grads = jax.jit(jax.grad(loss), static_argnums=1)(model.params, model.config)
        tokens = jaxlora.generate(model.params, model.config, ids, max_new_tokens=10).tokens
        return np.asarray(logits), jax.tree.map(np.asarray, grads), tokens

    report = {}
    # The default dispatch on every mesh; dense (the plain einsums XLA partitions most directly) on one.
    meshes = {"blocked": ("expert=8", "data=2,expert=4", "expert=2,tensor=4"), "dense": ("expert=8",)}
    for impl, specs in meshes.items():
        want_logits, want_grads, want_tokens = results(jaxlora.load(model_path, moe=impl))
        for spec in specs:
            model = jaxlora.load(model_path, mesh=make_mesh(spec), moe=impl)
            logits, grads, tokens = results(model)
            report.setdefault(spec, {})[impl] = {
                "max_logit_diff": float(np.abs(logits - want_logits).max()),
                "max_grad_diff": max(
                    float(np.abs(a - b).max())
                    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True)
                ),
                "tokens_equal": bool((tokens == want_tokens).all()),
                "gate_spec": str(model.params["layers_0"]["moe"]["gate"].sharding.spec),
            }
    print(json.dumps(report))


def scanned(model_path):
    """Stacked params on a mesh: logits, greedy tokens and two LoRA steps vs one unrolled device."""
    import optax

    import jaxlora
    from jaxlora import lora
    from jaxlora.sharding import make_mesh, replicate
    from jaxlora.train import init_state, make_train_step

    ids = np.random.default_rng(0).integers(0, 97, size=(4, 13)).astype(np.int32)
    batch = {"input_ids": ids[None], "attention_mask": np.ones_like(ids)[None], "loss_mask": np.ones_like(ids)[None]}

    def results(model, mesh):
        logits = jax.jit(jaxlora.forward, static_argnums=1)(model.params, model.config, ids)
        tokens = jaxlora.generate(model.params, model.config, ids, max_new_tokens=10).tokens
        adapters = lora.init(model.config, jax.random.key(0), rank=4, targets=("q_proj", "v_proj", "down_proj"))
        # Plain SGD: its update is linear in the gradient, so what differs is the layouts' rounding, not Adam's
        # first steps dividing near-zero gradients by their own size (3e-5 apart on one mesh, unrolled).
        optimizer = optax.sgd(0.5)
        state = init_state(adapters if mesh is None else replicate(adapters, mesh), optimizer, jax.random.key(1))
        step = make_train_step(model.params, model.config, optimizer)
        for _ in range(2):
            state, _ = step(state, batch)
        return np.asarray(logits), tokens, jax.tree.map(np.asarray, state.trainable.per_layer().weights)

    want_logits, want_tokens, want_adapters = results(jaxlora.load(model_path, scan_layers=False), None)
    report = {}
    for spec in ("data=2,tensor=4", "fsdp=2,tensor=4"):
        mesh = make_mesh(spec)
        model = jaxlora.load(model_path, mesh=mesh, scan_layers=True)
        logits, tokens, adapters = results(model, mesh)
        report[spec] = {
            "max_logit_diff": float(np.abs(logits - want_logits).max()),
            "tokens_equal": bool((tokens == want_tokens).all()),
            "max_adapter_diff": max(
                float(np.abs(a - b).max())
                for a, b in zip(jax.tree.leaves(adapters), jax.tree.leaves(want_adapters), strict=True)
            ),
            "q_proj_spec": str(model.params["stacks_0"]["blocks_0"]["attn"]["q_proj"]["kernel"].sharding.spec),
        }
    print(json.dumps(report))


def latent(model_path):
    """Latent attention on meshes: heads of the latent projections over `tensor`, the one-latent cache whole,
    experts over `expert`; logits and greedy tokens (prefill and cached decoding) vs one device."""
    import jaxlora
    from jaxlora.sharding import make_mesh

    ids = np.random.default_rng(1).integers(0, 97, size=(4, 9)).astype(np.int32)

    def results(model):
        logits = jax.jit(jaxlora.forward, static_argnums=1)(model.params, model.config, ids)
        return np.asarray(logits), jaxlora.generate(model.params, model.config, ids, max_new_tokens=10).tokens

    want_logits, want_tokens = results(jaxlora.load(model_path))
    report = {}
    for spec in ("data=2,expert=2,tensor=2", "fsdp=2,tensor=4"):
        model = jaxlora.load(model_path, mesh=make_mesh(spec))
        logits, tokens = results(model)
        attn = model.params["layers_1"]["attn"]
        report[spec] = {
            "max_logit_diff": float(np.abs(logits - want_logits).max()),
            "tokens_equal": bool((tokens == want_tokens).all()),
            "kv_b_spec": str(attn["kv_b_proj"]["kernel"].sharding.spec),
            "o_spec": str(attn["o_proj"]["kernel"].sharding.spec),
        }
    print(json.dumps(report))


def engine(model_path):
    """The serving engine on meshes: params as `load(mesh=...)` lays them, the KV pool's heads over `tensor`;
    every request's greedy tokens and log-probs vs the engine on one device."""
    import jaxlora
    from jaxlora.engine import Engine
    from jaxlora.sharding import make_mesh

    rng = np.random.default_rng(4)
    system = rng.integers(0, 128, 24).tolist()
    requests = [
        dict(
            prompt=(system if i % 2 else []) + rng.integers(0, 128, int(rng.integers(3, 30))).tolist(),
            max_tokens=int(rng.integers(1, 20)),
            logprobs=2,
        )
        for i in range(10)
    ]

    def run(model):
        engine = Engine(model.params, model.config, max_batch=4, max_len=128, block_size=8)
        ids = [engine.submit(**r) for r in requests]
        tokens, logprobs = {i: [] for i in ids}, {i: [] for i in ids}
        while not engine.idle:
            for event in engine.step():
                tokens[event.id] += event.tokens
                logprobs[event.id] += [e.logprob for e in event.logprobs]
        return [tokens[i] for i in ids], [logprobs[i] for i in ids], engine

    want_tokens, want_logprobs, _ = run(jaxlora.load(model_path))
    report = {}
    for spec in ("data=2,tensor=4", "fsdp=2,tensor=2,data=2"):
        tokens, logprobs, sharded = run(jaxlora.load(model_path, mesh=make_mesh(spec)))
        report[spec] = {
            "tokens_equal": tokens == want_tokens,
            "max_logprob_diff": max(
                float(np.abs(np.subtract(a, b)).max()) for a, b in zip(logprobs, want_logprobs, strict=True)
            ),
            "pool_spec": str(sharded.pools.keys[0].sharding.spec),
        }
    print(json.dumps(report))


def process(model_path, ids_path, process_id, port):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=process_id, initialization_timeout=60
    )
    import jaxlora
    from jaxlora.sharding import make_mesh

    mesh = make_mesh("data=2,tensor=4")  # all 8 devices of both processes
    model = jaxlora.load(model_path, mesh=mesh)
    q = model.params["layers_0"]["attn"]["q_proj"]["kernel"]
    ids = np.load(ids_path)
    tokens = jaxlora.generate(model.params, model.config, ids, max_new_tokens=12).tokens
    print(
        json.dumps(
            {
                "process": jax.process_index(),
                "global_devices": jax.device_count(),
                "local_devices": jax.local_device_count(),
                "local_q_shards": len(q.addressable_shards),
                "tokens": tokens.tolist(),
            }
        )
    )
    jax.distributed.shutdown()


if __name__ == "__main__":
    mode, *args = sys.argv[1:]
    if mode == "meshes":
        meshes(*args)
    elif mode == "experts":
        experts(*args)
    elif mode == "scanned":
        scanned(*args)
    elif mode == "latent":
        latent(*args)
    elif mode == "engine":
        engine(*args)
    else:
        process(args[0], args[1], int(args[2]), int(args[3]))
