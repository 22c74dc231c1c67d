"""memory_report(costs=, sample=): the planner's predicted peak of a train_step per rank against the
peak measure_peak measures (the rise of the process's VmHWM plus the tensors held before the step),
on 2 Gloo ranks: a tiny Llama pipelined (1F1B, 2 micro-batches) and tensor parallel."""
import copy

import pytest
import torch
import torch.nn.functional as F

import torch_mp
from torch_mp._planner.costs import measure_costs
from distributed import run_ranks

transformers = pytest.importorskip("transformers")

VOCAB = 1000


def llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(num_hidden_layers=4, hidden_size=256, intermediate_size=1024,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                      max_position_embeddings=64, bos_token_id=0, eos_token_id=1, pad_token_id=0,
                                      use_cache=False, attn_implementation="eager")
    return transformers.LlamaForCausalLM(config)


def loss_fn(output, ids):
    return F.cross_entropy(output.logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))


def ids():
    return torch.randint(0, VOCAB, (8, 64), generator=torch.Generator().manual_seed(3))


def check_predicted_peak(rank, world, kind, costs, checked):
    batch = ids()
    if kind == "pipeline":
        model = torch_mp.pipeline(llama(), chunks=2, schedule="1f1b", timeout=120)

        def step():
            model.train_step(input_ids=batch, target=batch, loss_fn=loss_fn)
    else:
        model = torch_mp.tensor_parallel(llama())

        def step():
            loss_fn(model(input_ids=batch), batch).backward()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if not p.is_meta])

    step()
    optimizer.step()  # the optimizer's state exists from here on
    optimizer.zero_grad(set_to_none=True)
    report = torch_mp.memory_report(model, costs=costs, sample={"input_ids": batch}, optimizer=optimizer)
    _, rise = torch_mp.measure_peak(step)
    held = report.rows[rank].total + sum(t.numel() * t.element_size() for s in optimizer.state.values()
                                         for t in s.values() if torch.is_tensor(t))
    measured = held + rise
    predicted = report.rows[rank].predicted.total
    print(report, f"\nrank {rank}: predicted {predicted / 2**20:.2f} MiB, measured {measured / 2**20:.2f} MiB")
    if rank in checked:
        assert abs(predicted - measured) <= 0.1 * measured, (rank, predicted, measured)


def dense_costs():
    return measure_costs(llama(), {"input_ids": ids()}, collectives=(5e-5, 1e-9))


@pytest.mark.full  # a process's peak moves by a few MiB from run to run: kept out of make test
def test_pipeline_first_stage_peak_within_ten_percent_of_measured():
    """1F1B, 2 micro-batches of 4 rows: stage 0 holds both in flight (measured 63.3-66.6 MiB over runs, predicted 61.0)."""
    run_ranks(2, check_predicted_peak, "pipeline", dense_costs(), (0,), timeout=400)


@pytest.mark.full
@pytest.mark.xfail(strict=True, reason="not modelled yet. Last stage: measured 62.7-63.7 MiB, predicted 49.2; "
                   "the extra is about one more micro-batch's activations though the 1F1B schedule runs F0 B0 F1 B1 "
                   "there. Tensor parallel: measured 95 MiB, predicted 70.6; the layers' saved bytes match the "
                   "planner's TP share (8.25 of 13.5 MiB a layer), the gap is ~17 MiB the TP forward holds outside "
                   "autograd's saved tensors, and the gathered logits' loss (3.5 MiB), which the planner divides by tp")
@pytest.mark.parametrize("kind,checked", [("pipeline", (1,)), ("tensor_parallel", (0, 1))])
def test_last_stage_and_tensor_parallel_peak_within_ten_percent(kind, checked):
    run_ranks(2, check_predicted_peak, kind, dense_costs(), checked, timeout=400)


def test_prediction_arguments_are_checked_before_anything_runs():
    costs = dense_costs()
    with pytest.raises(ValueError, match="got costs=a CostTable and sample=None; expected both"):
        torch_mp.memory_report(llama(), costs=costs)
    with pytest.raises(ValueError, match="costs= predicts the peak of a tensor_parallel or pipeline model; got a "
                       "plain LlamaForCausalLM"):
        torch_mp.memory_report(llama(), costs=costs, sample={"input_ids": ids()})
    with pytest.raises(TypeError, match="memory_report: expected costs to be a torch_mp.CostTable, got dict"):
        torch_mp.memory_report(llama(), costs={}, sample={"input_ids": ids()})


def test_measure_peak_counts_a_tensor_made_where_a_freed_one_was():
    """A 16 MiB tensor made inside fn raises the peak by 16 MiB (allocator noise: a few MiB), also
    after tensors of that size were freed (glibc's growing mmap threshold would keep them in the
    heap, resident before fn starts)."""
    for _ in range(2):
        torch.ones(4 << 20).sum()
    tensor, rise = torch_mp.measure_peak(lambda: torch.ones(4 << 20))
    assert 16 << 20 <= rise <= 20 << 20, rise / 2**20
    del tensor
