"""Pipeline x tensor x data parallel in one mesh (``init_mesh(pp=, dp=, tp=)``; ``tensor_parallel``
on mesh["tp"], then ``pipeline`` on mesh["pp"] with ``data_parallel=mesh["dp"]``) against the dense
model: the loss, every gradient gathered with ``full_state_dict``, ``torch_mp.clip_grad_norm_``, an
AdamW step, ``torch_mp.GradScaler``'s decision, the pipeline's own recompute (``checkpoint=``),
checkpoints across layouts, and examples/python/train_3d.py under torchrun (each rank within its
``--max-memory``, the dense losses). Tiny transformers
Llama and Mixtral with random weights, on 4 Gloo ranks (pp 2 x tp 2) and 8 (pp 2 x tp 2 x dp 2).

The 8-rank runs and the less common combinations are marked ``mesh3d_full`` (``make test-mesh3d``
runs them; ``make test`` the rest)."""
import functools
import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

import torch_mp
from distributed import run_ranks
from tensors import expect_dense_gradients, expect_dense_step, expect_dense_weights

transformers = pytest.importorskip("transformers")

VOCAB = 64
FULL = pytest.mark.mesh3d_full


def randomized(model, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn(param.shape))
    return model


def llama(seed=0, layers=4, heads=4, kv_heads=2, tied=False):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(num_hidden_layers=layers, hidden_size=8 * heads, intermediate_size=64,
                                      num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=VOCAB,
                                      max_position_embeddings=32, bos_token_id=0, eos_token_id=1, pad_token_id=0,
                                      use_cache=False, tie_word_embeddings=tied)
    return randomized(transformers.LlamaForCausalLM(config), seed + 100)


def mixtral(seed=0):
    torch.manual_seed(seed)
    config = transformers.MixtralConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=32,
        use_cache=False, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model = randomized(transformers.MixtralForCausalLM(config), seed + 100)
    with torch.no_grad():  # experts and routers far from ties: every expert's output matters
        for name, param in model.named_parameters():
            if param.dim() == 3:
                param.normal_(0, 0.2)
            elif name.endswith("gate.weight"):
                param.normal_(0, 0.5)
    return model


def loss_fn(output, ids):
    return F.cross_entropy(output.logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))


def batch(rows, seed=0):
    return torch.randint(0, VOCAB, (rows, 8), generator=torch.Generator().manual_seed(seed))


def parallelized(make, mesh, schedule="1f1b", sequence_parallel=False, chunks=2):
    """torchtitan's order: tensor parallel over mesh["tp"], then the pipeline over mesh["pp"] with
    its replicas over mesh["dp"]."""
    model = torch_mp.tensor_parallel(make(), group=mesh["tp"], sequence_parallel=sequence_parallel)
    return torch_mp.pipeline(model, group=mesh["pp"], data_parallel=mesh["dp"], chunks=chunks, schedule=schedule)


def adamw(model, eps=1e-8):
    return torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1, eps=eps)


def check_matches_dense(rank, world, pp, dp, tp, make, schedule, sequence_parallel):
    mesh = torch_mp.init_mesh(pp=pp, dp=dp, tp=tp)
    dense = make()
    model = parallelized(make, mesh, schedule, sequence_parallel)
    rows = 4
    ids = batch(rows * dp)
    replica = mesh["dp"].get_local_rank()
    mine = ids[rows * replica:rows * (replica + 1)]

    # The loss and every gradient, gathered as the dense model's state_dict.
    expect_dense_step(model, dense, mine, ids, loss_fn)

    # The dense norm over the whole mesh (each element once), the dense clipping and AdamW step.
    norm = torch_mp.clip_grad_norm_(model, max_norm=0.5)
    dense_norm = torch.nn.utils.clip_grad_norm_(dense.parameters(), max_norm=0.5)
    torch.testing.assert_close(norm, dense_norm, rtol=1e-5, atol=1e-6)
    assert norm > 0.5  # the clip changed the step
    # Adam's first step moves each element by lr * g / (|g| + eps): with eps 1e-8, where g is ~1e-7
    # the float rounding of g (summed in another order across ranks) shows at 1e-4 of the weight;
    # eps 1e-4 keeps the step a smooth function of g.
    adamw(model, eps=1e-4).step()
    adamw(dense, eps=1e-4).step()
    expect_dense_weights(model, dense)


@pytest.mark.parametrize("schedule,sequence_parallel", [
    ("1f1b", False), ("zbv", True),
    pytest.param("1f1b", True, marks=FULL), pytest.param("zbv", False, marks=FULL)])
def test_llama_pp2_tp2_matches_dense(schedule, sequence_parallel):
    run_ranks(4, check_matches_dense, 2, 1, 2, llama, schedule, sequence_parallel, timeout=400)


@FULL
@pytest.mark.parametrize("schedule,sequence_parallel", [("1f1b", True), ("zbv", False)])
def test_llama_pp2_tp2_dp2_matches_dense(schedule, sequence_parallel):
    run_ranks(8, check_matches_dense, 2, 2, 2, llama, schedule, sequence_parallel, timeout=600)


def test_mixtral_pp2_tp2_matches_dense():
    """Experts inside each stage, parallel over the stage's tensor-parallel group (all_to_all)."""
    run_ranks(4, check_matches_dense, 2, 1, 2, mixtral, "1f1b", False, timeout=400)


@pytest.mark.parametrize("schedule", ["1f1b", "zbv"])
def test_mixtral_pp2_matches_dense(schedule):
    """Pipelined alone, its experts whole on their stage's rank: the other rank runs them as meta
    stand-ins, whose grouped matmul (transformers' experts) has a meta kernel for bf16 only (it
    raised "Expected mat_a to be BFloat16")."""
    run_ranks(2, check_matches_dense, 2, 1, 1, mixtral, schedule, False, timeout=400)


def summed_loss(output, labels):
    return F.cross_entropy(output.logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), reduction="sum")


def check_normalizer_over_replicas(rank, world):
    mesh = torch_mp.init_mesh(pp=2, dp=2, tp=1)
    dense = llama()
    model = torch_mp.pipeline(llama(), group=mesh["pp"], data_parallel=mesh["dp"], chunks=2)
    ids = batch(8)
    labels = ids.clone()
    labels[0, 3:] = labels[1, 5:] = labels[5, 2:] = -100  # padding: replica 0 has fewer real tokens
    rows = slice(4 * mesh["dp"].get_local_rank(), 4 * mesh["dp"].get_local_rank() + 4)
    tokens = int((labels[:, 1:] != -100).sum())
    for normalizer in (lambda t: (t[:, 1:] != -100).sum(), tokens):
        loss = model.train_step(input_ids=ids[rows], target=labels[rows], loss_fn=summed_loss, normalizer=normalizer)
        expected = summed_loss(dense(input_ids=ids), labels) / tokens
        expected.backward()
        torch.testing.assert_close(loss, expected.detach(), rtol=1e-5, atol=1e-6)
        expect_dense_gradients(model, dense)
        model.zero_grad(set_to_none=True)
        dense.zero_grad(set_to_none=True)


def test_normalizer_divides_the_sum_over_every_replicas_batch():
    """train_step(..., normalizer=) on pp 2 x dp 2, each replica with its own rows of a padded
    batch (its own count of real tokens): the loss is the sum over both replicas' tokens divided
    by the count over both, as the dense model's; a callable normalizer and the count given as a
    number alike (the replicas' mean of their own token means was returned: 4.75 against 4.98,
    and a number gave the dense loss / dp)."""
    run_ranks(4, check_normalizer_over_replicas, timeout=400)


def check_each_rank_holds_its_share(rank, world):
    """pp 2 x tp 2: after the first step each rank holds only what its stage uses (the embedding on
    the first stage, the final norm and head on the last; a tied embedding/head on both, its
    gradient summed between just them), in shards of its tensor-parallel group; the dense numbers
    over three AdamW steps."""
    mesh = torch_mp.init_mesh(pp=2, dp=1, tp=2)
    first = mesh["pp"].get_local_rank() == 0
    ids = batch(4)
    for tied in (True, False):
        make = functools.partial(llama, layers=2, tied=tied)
        dense = make()
        model = parallelized(make, mesh)
        assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
        dense_optimizer, optimizer = adamw(dense, eps=1e-4), adamw(model, eps=1e-4)
        for step in range(3):  # the first places the tensors outside the layers; the others run so
            loss = model.train_step(input_ids=ids, target=ids, loss_fn=loss_fn)
            expected = loss_fn(dense(input_ids=ids), ids)
            expected.backward()
            torch.testing.assert_close(loss, expected.detach(), rtol=1e-5, atol=1e-6, msg=f"tied {tied}, step {step}")
            expect_dense_gradients(model, dense, f"tied {tied}, step {step}: ")
            optimizer.step()
            dense_optimizer.step()
            optimizer.zero_grad()
            dense_optimizer.zero_grad()
        expect_dense_weights(model, dense)

        # What this rank holds: its stage's layer, with the embedding on the first stage and the
        # final norm and head on the last (the tied weight on both).
        held = {name for name, p in model.named_parameters(remove_duplicate=False) if not p.is_meta}
        ends = {"model.embed_tokens.weight"} if first else {"model.norm.weight", "lm_head.weight"}
        if tied:
            ends |= {"model.embed_tokens.weight", "lm_head.weight"}
        layer = f"model.layers.{0 if first else 1}."
        assert held == ends | {name for name, _ in dense.named_parameters() if name.startswith(layer)}, held
        # Bytes held per rank against the ideal: the dense model's (a tied weight once per end it is
        # used at) over the 4 ranks; shards and norms replicated over tp make up the difference.
        mine = sum(p.to_local().nbytes if isinstance(p, DTensor) else p.nbytes
                   for p in model.parameters() if not p.is_meta)
        shares = [None] * world
        dist.all_gather_object(shares, mine)
        ideal = (sum(p.nbytes for p in dense.parameters())
                 + (dense.lm_head.weight.nbytes if tied else 0)) / world
        assert max(shares) <= 1.02 * ideal, (tied, shares, ideal)


def test_each_rank_holds_its_share_pp2_tp2():
    run_ranks(4, check_each_rank_holds_its_share, timeout=400)


def check_recompute_matches_dense(rank, world, pp, tp, checkpoint, reentrant):
    """The pipeline's own recompute (``checkpoint=``) of placed modules holding DTensor parameters
    (the final norm: its weight is seen through ``LocalViews`` during its forward only): the loss
    and every gradient of the dense model. ``reentrant`` not None: transformers' gradient
    checkpointing around the decoder layers too (with use_reentrant=reentrant)."""
    mesh = torch_mp.init_mesh(pp=pp, dp=1, tp=tp)
    dense = llama(layers=2 * pp)
    model = torch_mp.tensor_parallel(llama(layers=2 * pp), group=mesh["tp"])
    if reentrant is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model = torch_mp.pipeline(model, group=mesh["pp"], chunks=2, schedule="1f1b", checkpoint=checkpoint)
    ids = batch(4)
    expect_dense_step(model, dense, ids, ids, loss_fn)


@pytest.mark.parametrize("checkpoint,reentrant", [("always", None), ("except_last", True)])
def test_llama_pp1_tp2_recompute_matches_dense(checkpoint, reentrant):
    run_ranks(2, check_recompute_matches_dense, 1, 2, checkpoint, reentrant, timeout=300)


def test_llama_pp2_tp2_recompute_matches_dense():
    run_ranks(4, check_recompute_matches_dense, 2, 2, "always", False, timeout=400)


def check_grad_scaler_decides_over_the_mesh(rank, world):
    """An overflow in one rank's shard (rank 3: the last stage's second shard) makes every rank of
    the mesh skip the step and back off its scale alike."""
    mesh = torch_mp.init_mesh(pp=2, dp=1, tp=2)
    model = parallelized(llama, mesh)
    ids = batch(4)
    scaler = torch_mp.GradScaler("cpu", init_scale=4.0, model=model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train_step(input_ids=ids, target=ids, loss_fn=lambda output, ids: scaler.scale(loss_fn(output, ids)))
    if rank == 3:  # in the local tensor: a DTensor's view(-1) would gather it, on this rank alone
        grad = next(p for p in model.parameters() if p.grad is not None).grad
        with torch.no_grad():
            (grad.to_local() if isinstance(grad, DTensor) else grad).view(-1)[0] = float("inf")
    # Local tensors: torch.equal of DTensors is an all-reduce over the world, and the ranks of the
    # two stages hold different numbers of parameters (each only its share).
    held = {name: p.to_local() if isinstance(p, DTensor) else p for name, p in model.named_parameters()
            if not p.is_meta}
    before = {name: p.detach().clone() for name, p in held.items()}
    scaler.step(optimizer)
    scaler.update()
    assert scaler.get_scale() == 2.0
    assert all(torch.equal(p, before[name]) for name, p in held.items())


def test_grad_scaler_skips_on_every_rank_of_the_mesh():
    run_ranks(4, check_grad_scaler_decides_over_the_mesh, timeout=300)


# --- checkpoints -------------------------------------------------------------------------------

def steps(model, optimizer, ids, count, piped=True):
    losses = []
    for _ in range(count):
        optimizer.zero_grad()
        if piped:
            losses.append(model.train_step(input_ids=ids, target=ids, loss_fn=loss_fn))
        else:
            loss = loss_fn(model(input_ids=ids), ids)
            loss.backward()
            losses.append(loss.detach())
        optimizer.step()
    return torch.stack(losses)


def check_checkpoints_across_layouts(rank, world, folder):
    """Saved at (pp 2, tp 2): loaded into the plain Llama, at (pp 1, tp 2), (pp 2, tp 1) and (pp 4,
    tp 1: one layer per rank), each then stepping as the dense model does; resumed at (pp 2, tp 2)
    bit-identical to the run that went on without stopping."""
    path = os.path.join(folder, "checkpoint")
    ids = batch(4)
    mesh = torch_mp.init_mesh(pp=2, dp=1, tp=2)
    model = parallelized(llama, mesh)
    optimizer = adamw(model)
    steps(model, optimizer, ids, 1)
    torch_mp.save(model, path, optimizer=optimizer)
    went_on = steps(model, optimizer, ids, 2)

    resumed = parallelized(lambda: llama(seed=7), mesh)
    resumed_optimizer = adamw(resumed)
    torch_mp.load(resumed, path, optimizer=resumed_optimizer)
    assert torch.equal(steps(resumed, resumed_optimizer, ids, 2), went_on)

    dense = llama(seed=7)
    dense_optimizer = adamw(dense)
    torch_mp.load(dense, path, optimizer=dense_optimizer)
    expected = steps(dense, dense_optimizer, ids, 2, piped=False)
    torch.testing.assert_close(went_on, expected, rtol=1e-5, atol=1e-6)

    for pp, dp, tp in ((1, 2, 2), (2, 2, 1), (4, 1, 1)):
        mesh = torch_mp.init_mesh(pp=pp, dp=dp, tp=tp)
        other = torch_mp.tensor_parallel(llama(seed=7), group=mesh["tp"])
        if pp > 1:
            torch_mp.pipeline(other, group=mesh["pp"], chunks=2)
        other_optimizer = adamw(other)
        torch_mp.load(other, path, optimizer=other_optimizer)
        losses = steps(other, other_optimizer, ids, 2, piped=pp > 1)
        torch.testing.assert_close(losses, expected, rtol=1e-5, atol=1e-6, msg=f"pp {pp} x tp {tp}")


def test_checkpoints_across_layouts(tmp_path):
    run_ranks(4, check_checkpoints_across_layouts, str(tmp_path), timeout=500)


def check_built_on_meta(rank, world, path):
    mesh = torch_mp.init_mesh(pp=2, dp=1, tp=2)
    with torch_mp.init_empty_weights():  # no rank ever holds the whole model
        model = parallelized(functools.partial(llama, tied=True), mesh)
    optimizer = adamw(model, eps=1e-4)  # built before the load: it steps the loaded parameters
    stage = mesh["pp"].get_local_rank()
    layers = model.model.layers
    held = [name for name, param in layers.named_parameters() if not param.is_meta]
    assert held == [], held  # this rank's layers wait on the meta device for their values
    ids = batch(4)
    with pytest.raises(ValueError, match=r"on the meta device.*expected torch_mp.load_full_state_dict\(model, "
                                         r"state_dict_or_path\)"):
        model.train_step(input_ids=ids, target=ids, loss_fn=loss_fn)

    torch_mp.load_full_state_dict(model, path)  # each rank reads its stages' slices of the file
    mine = {name.split(".")[0] for name, param in layers.named_parameters() if not param.is_meta}
    assert mine == ({"0", "1"} if stage == 0 else {"2", "3"}), mine  # the other stage's layers stay stand-ins
    dense = llama(tied=True)
    layer_bytes = sum(p.numel() for p in dense.model.layers.parameters())
    local = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel()
                for p in layers.parameters() if not p.is_meta)
    assert local < 0.3 * layer_bytes, (local, layer_bytes)  # its stage's half, sharded over tp 2 (norms whole)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied after the load
    expect_dense_step(model, dense, ids, ids, loss_fn)
    torch_mp.clip_grad_norm_(model, max_norm=0.5)  # as check_matches_dense: Adam's step smooth in g
    torch.nn.utils.clip_grad_norm_(dense.parameters(), max_norm=0.5)
    optimizer.step()
    adamw(dense, eps=1e-4).step()
    expect_dense_weights(model, dense)

    # Resumed into a model built on meta again, with its AdamW state: the next step bit for bit (the
    # state of this rank's meta parameters was skipped as another rank's: a fresh AdamW's step).
    optimizer.zero_grad()
    checkpoint = os.path.join(path, "checkpoint")
    torch_mp.save(model, checkpoint, optimizer=optimizer)
    with torch_mp.init_empty_weights():
        resumed = parallelized(functools.partial(llama, tied=True), mesh)
    resumed_optimizer = adamw(resumed, eps=1e-4)
    torch_mp.load(resumed, checkpoint, optimizer=resumed_optimizer)
    mine = [p for p in resumed.model.layers.parameters() if not p.is_meta]
    assert mine and all(p in resumed_optimizer.state for p in mine)  # this rank's layers' AdamW state
    for run, run_optimizer in ((model, optimizer), (resumed, resumed_optimizer)):
        run.train_step(input_ids=ids, target=ids, loss_fn=loss_fn)
        run_optimizer.step()
    after, resumed_after = torch_mp.full_state_dict(model), torch_mp.full_state_dict(resumed)
    for name, value in after.items():
        torch.testing.assert_close(resumed_after[name], value, rtol=0, atol=0, msg=lambda m, name=name: f"{name}: {m}")


def test_built_on_meta_loads_only_each_ranks_share(tmp_path):
    """A model built under init_empty_weights, sharded over pp 2 x tp 2, then loaded from a
    safetensors file: each rank materializes only its stages' shards, in place (the optimizer built
    before steps them; the tied head stays tied), and trains to the dense numbers; a step before
    the load is a ValueError on every rank, not a step on meta tensors; torch_mp.load into such a
    model takes its optimizer state and resumes bit for bit."""
    safetensors = pytest.importorskip("safetensors.torch")
    state = {name: value.clone().contiguous() for name, value in llama(tied=True).state_dict().items()}
    safetensors.save_file(state, str(tmp_path / "model.safetensors"))
    run_ranks(4, check_built_on_meta, str(tmp_path), timeout=300)


# --- bad input ---------------------------------------------------------------------------------

def check_bad_input(rank, world):
    with pytest.raises(ValueError, match=r"init_mesh: pp=2 x dp=1 x tp=3 = 6 ranks but the world has 4; expected "
                                         r"pp \* dp \* tp == world size"):
        torch_mp.init_mesh(pp=2, dp=1, tp=3)
    with pytest.raises(ValueError, match=r"init_mesh: pp = 0; expected an int >= 1"):
        torch_mp.init_mesh(pp=0, dp=2, tp=2)
    mesh = torch_mp.init_mesh(pp=2, dp=1, tp=2)
    assert mesh.mesh_dim_names == ("pp", "dp", "tp")
    # Tensor parallel innermost (Megatron-Core's order): ranks differing by one share a TP group.
    assert dist.get_process_group_ranks(mesh["tp"].get_group()) == [rank - rank % 2, rank - rank % 2 + 1]
    assert dist.get_process_group_ranks(mesh["pp"].get_group()) == [rank % 2, rank % 2 + 2]
    assert torch_mp.init_mesh(dp=2, tp=2).mesh_dim_names == ("dp", "tp")  # without pp: 2-D, as before

    # The other order is refused, naming the one to use.
    piped = torch_mp.pipeline(llama(), group=mesh["pp"])
    with pytest.raises(ValueError, match=r"tensor_parallel: LlamaForCausalLM was already returned by "
                                         r"torch_mp.pipeline; expected torch_mp.tensor_parallel first, then "
                                         r"torch_mp.pipeline"):
        torch_mp.tensor_parallel(piped, group=mesh["tp"])
    # More pipeline ranks than layers.
    deep = torch_mp.init_mesh(pp=4, dp=1, tp=1)
    with pytest.raises(ValueError, match=r"pipeline: pp = 4 ranks x 1 stage\(s\) per rank = 4 stages but "
                                         r"LlamaForCausalLM has 2 layers to cut \(a stage holds one layer or more\); "
                                         r"expected at most 2 pipeline ranks for schedule '1f1b'$"):
        torch_mp.pipeline(llama(layers=2), group=deep["pp"])
    # ZB-V's two stages per rank: the message says how many ranks it takes and the way out.
    with pytest.raises(ValueError, match=r"expected at most 1 pipeline ranks for schedule 'zbv', or a schedule with "
                                         r"one stage per rank \('1f1b', 'zb_h1', 'gpipe'\) on up to 3 ranks"):
        torch_mp.pipeline(llama(layers=3), group=mesh["pp"], schedule="zbv")
    # A tensor-parallel size that does not divide the heads.
    with pytest.raises(ValueError, match=r"tensor_parallel: .*=6, not divisible by the group size 4"):
        torch_mp.tensor_parallel(llama(heads=6, kv_heads=6), group=torch_mp.init_mesh(pp=1, dp=1, tp=4)["tp"])
    # Options that differ across a tensor-parallel group: refused before anything runs.
    sharded = torch_mp.tensor_parallel(llama(), group=mesh["tp"])
    with pytest.raises(ValueError, match=r"pipeline: the ranks \[\d, \d\] of tp pass different chunks \(by rank: "
                                         r"chunks: \[2, 4\]\); expected the same options on every rank of the mesh"):
        torch_mp.pipeline(sharded, group=mesh["pp"], chunks=2 if rank % 2 == 0 else 4)
    # A data-parallel group that is not orthogonal to the pipeline's.
    replicas = torch_mp.init_mesh(pp=2, dp=2, tp=1)
    with pytest.raises(ValueError, match=r"pipeline: data_parallel = pp of ranks \[\d, \d\] shares ranks \[\d\] with "
                                         r"group; expected the replicas' group"):
        torch_mp.pipeline(llama(), group=replicas["pp"], data_parallel=replicas["pp"])


def test_bad_input_is_a_clear_error_before_any_collective():
    run_ranks(4, check_bad_input, timeout=300)


def run_train_3d(nproc, *args, timeout=400):
    """examples/python/train_3d.py under torchrun: its return code, stdout and stderr."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
         os.path.join(root, "examples", "python", "train_3d.py"), *args],
        capture_output=True, text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})


def loss_rows(stdout):
    """train_3d's "step  mesh loss  dense loss" rows, split."""
    return [line.split() for line in stdout.splitlines() if len(line.split()) == 3 and line.split()[0].isdigit()]


@pytest.mark.parametrize("nproc,dp", [(4, 1), pytest.param(8, 2, marks=FULL)])
def test_train_3d_example_holds_each_rank_within_max_memory(nproc, dp):
    """The example on pp 2 x tp 2 (x dp 2): the dense model's parameters and AdamW state exceed the
    default max_memory (1 MiB), each rank holds a quarter of the dense parameters, gradients and
    AdamW state (the ideal share: its stage's half, in tp 2 shards) within it, and every step's loss
    is the dense model's."""
    result = run_train_3d(nproc, "--pp", "2", "--tp", "2", "--steps", "3")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    lines = result.stdout.splitlines()
    dense = next(line for line in lines if line.startswith("dense model:"))
    assert "= 2.069 MiB (2.759 MiB with gradients) exceeds max_memory 1.000 MiB" in dense, dense
    header = next(i for i, line in enumerate(lines) if line.split()[:5] == ["rank", "pp", "dp", "tp", "parameters"])
    rows = [line.split() for line in lines[header + 1:header + 1 + nproc]]
    assert [int(row[0]) for row in rows] == list(range(nproc))
    assert sorted({(int(row[1]), int(row[2]), int(row[3])) for row in rows}) == [
        (pp, d, tp) for pp in range(2) for d in range(dp) for tp in range(2)]
    for row in rows:
        parameters, _, gradients, adamw, total = map(float, row[4:9])
        # A quarter of the dense 0.690 MiB, the norms replicated over tp: within 2% of the ideal.
        assert 0.690 / 4 <= parameters <= 1.02 * 0.690 / 4, row
        assert gradients == parameters and abs(adamw - 2 * parameters) <= 0.002, row
        assert total <= 1.0, row
    assert any(line.startswith("every rank within max_memory: largest 0.69") for line in lines), result.stdout
    steps = loss_rows(result.stdout)
    assert [int(step[0]) for step in steps] == [0, 1, 2], result.stdout
    for _, got, expected in steps:
        assert abs(float(got) - float(expected)) <= 1e-5 * abs(float(expected)) + 2e-6, (got, expected)
    assert "losses equal to the dense model's over 3 steps" in result.stdout


def test_train_3d_example_refuses_a_rank_over_max_memory():
    """pp 2 x tp 1: each rank holds half the dense model, parameters, gradients and AdamW state
    (1.38 MiB), over the default max_memory of 1 MiB: every rank stops with an error naming the
    ranks, their bytes and the limit."""
    result = run_train_3d(2, "--pp", "2", "--tp", "1", "--steps", "2")
    assert result.returncode != 0
    assert ("train_3d: ranks [0, 1] hold ['1.379 MiB', '1.380 MiB'] (parameters, buffers, gradients, AdamW state) "
            "after the first step; expected at most --max-memory 1.000 MiB each") in result.stderr, \
        result.stderr[-3000:]
    assert [int(step[0]) for step in loss_rows(result.stdout)] == [0], result.stdout  # no second step
