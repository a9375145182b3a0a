"""Low-rank adapters (transforms/lora.py, train.py --lora-rank): the adapted layer's gradients are autograd's on the
explicit W + (alpha/r) B A, the merged model gives the adapted model's logits, training changes only the adapters
(the step-0 check still exact), a killed run resumes bitwise, two DDP processes equal one, --shard is refused in
one line, and peft loads the saved adapter onto the base model with the merged model's logits."""
import copy
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import train
from conftest import make_tiny_model
from model_loader import load_model
from transforms import lora
from formats.files import MipoError
from test_train import args_for, assert_same_metrics, completed_run, final_weights, make_assets, metrics, run_cli

LORA = ("--lora-rank", "4", "--epochs", "2", "--save-every", "2", "--micro-batch-size", "2")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("lora"))


@pytest.fixture(scope="module")
def lora_run(assets):
    """A LoRA run, uninterrupted, in a process of its own."""
    return completed_run(assets, "lora", *LORA)[0]


def test_adapter_gradients_equal_autograd_on_the_explicit_weight():
    torch.manual_seed(0)
    base = torch.nn.Linear(12, 10)
    layer = lora.LoRALinear(base, rank=3, alpha=6.0, generator=torch.Generator().manual_seed(1))
    torch.nn.init.normal_(layer.lora_B.weight)  # B = 0 would make A's gradient 0
    x = torch.randn(5, 12)
    (layer(x) ** 2).sum().backward()
    A = layer.lora_A.weight.detach().clone().requires_grad_()
    B = layer.lora_B.weight.detach().clone().requires_grad_()
    (F.linear(x, base.weight + (6.0 / 3) * B @ A, base.bias) ** 2).sum().backward()
    torch.testing.assert_close(layer.lora_A.weight.grad, A.grad)
    torch.testing.assert_close(layer.lora_B.weight.grad, B.grad)
    assert base.weight.grad is None and base.bias.grad is None  # frozen


def test_the_merged_model_gives_the_adapted_models_logits():
    model = make_tiny_model("qwen2", vocab_size=97)
    lora.add_adapters(model, rank=4, alpha=8.0)
    assert len(lora.adapters(model)) == 7 * model.config.num_hidden_layers
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        untouched = model(ids)
        for module in lora.adapters(model).values():
            torch.nn.init.normal_(module.lora_B.weight, std=0.05)
        adapted = model(ids)
        merged = copy.deepcopy(model)
        lora.merge(merged)
        assert not lora.adapters(merged) and set(merged.state_dict()) == set(make_tiny_model("qwen2").state_dict())
        torch.testing.assert_close(merged(ids), adapted, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(adapted, untouched)


def test_lora_trains_only_the_adapters_from_an_exact_step_0(assets, lora_run):
    first = metrics(lora_run)[0]
    assert first["step0/max_abs_logp_diff"] == 0 and first["loss"] == pytest.approx(0.6931471805599453, abs=1e-7)
    base, trained = load_file(assets["model"] / "model.safetensors"), final_weights(lora_run)
    assert base.keys() == trained.keys()
    adapted = {k for k in base if any(f".{t}." in k for t in lora.TARGETS)}
    assert adapted and all(not torch.equal(base[k], trained[k]) for k in adapted)  # merged adapters moved them
    assert all(torch.equal(base[k], trained[k]) for k in base.keys() - adapted)  # embeddings, norms: untouched
    assert (lora_run / "adapter" / "adapter_config.json").is_file()


def test_a_killed_lora_run_resumes_to_identical_weights(assets, lora_run, tmp_path):
    out = tmp_path / "resumed"
    killed = run_cli([*args_for(assets, out, *LORA), "--_crash-at", "train:3"])
    assert killed.returncode == -9, killed.stderr[-2000:]
    resumed = run_cli(args_for(assets, out, *LORA))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stdout
    a, b = final_weights(out), final_weights(lora_run)
    assert all(torch.equal(a[k], b[k]) for k in a)  # bitwise


def test_two_process_ddp_lora_equals_one_process(assets, lora_run, tmp_path):
    out = tmp_path / "ddp"
    launcher = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")
    result = run_cli(args_for(assets, out, *LORA), launcher=launcher)
    assert result.returncode == 0, result.stderr[-3000:]
    assert metrics(out)[0]["step0/max_abs_logp_diff"] == 0
    assert_same_metrics(out, lora_run)  # the loss, the gradient norm and the rewards at every step
    start, got, want = load_file(assets["model"] / "model.safetensors"), final_weights(out), final_weights(lora_run)
    for name in want:  # as test_train.assert_same_update, where the frozen weights have not moved at all
        moved = (want[name] - start[name]).abs().max().item()
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-5 + 1e-2 * moved)


def test_lora_under_fsdp_is_refused_in_one_line(assets, tmp_path):
    with pytest.raises(MipoError, match="--lora-rank with --shard: not supported"):
        train.main(args_for(assets, tmp_path / "x", "--lora-rank", "4", "--shard"))
    assert not (tmp_path / "x").exists()


def test_peft_loads_the_saved_adapter_with_the_merged_models_logits(assets, lora_run):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(assets["model"], dtype=torch.float32)
    with_adapter = peft.PeftModel.from_pretrained(base, lora_run / "adapter").eval()
    merged, _ = load_model(lora_run / "final")
    ids = torch.randint(0, 200, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(with_adapter(input_ids=ids).logits, merged(ids), rtol=1e-4, atol=1e-4)
