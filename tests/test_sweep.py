"""A sweep (bookkeeping/sweep.py): one train.py command with lists of loss and optimization settings trains each
combination exactly as the single command would, from pairs sampled once and reference log-probs computed once,
refuses a list of a setting that changes the pairs, resumes after a kill, and eval.py --compare takes the whole
sweep directory."""
import os
from types import SimpleNamespace

import pytest
import torch

import mipo
import train
from bookkeeping import report, results, runs, sweep
from formats.files import MipoError
from test_train import args_for, completed_run, final_weights, make_assets, metrics, run_cli

SWEEP = ("--loss", "sigmoid", "ipo", "--beta", "0.1", "0.3", "--n-eval", "4")
VARIANTS = ["loss-sigmoid_beta-0.1", "loss-sigmoid_beta-0.3", "loss-ipo_beta-0.1", "loss-ipo_beta-0.3"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("sweep"))


@pytest.fixture(scope="module")
def swept(assets):
    """The sweep, uninterrupted, in a process of its own (as the single commands it is compared with)."""
    return completed_run(assets, "sweep", *SWEEP)


def test_a_sweep_trains_each_variant_as_its_single_command_would(assets, swept, tmp_path):
    out, result = swept
    assert [d.name for d in sweep.variant_dirs(out)] == VARIANTS
    single = tmp_path / "single"
    one = run_cli(args_for(assets, single, "--loss", "ipo", "--beta", "0.3", "--n-eval", "4"))
    assert one.returncode == 0, one.stderr[-2000:]
    a, b = final_weights(out / "loss-ipo_beta-0.3"), final_weights(single)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bitwise
    def logged(run):  # every number a step logs but its speed
        return [{k: v for k, v in m.items() if k not in ("tokens/s", "pairs/s")} for m in metrics(run)]

    assert logged(out / "loss-ipo_beta-0.3") == logged(single)
    # Each variant's directory is a single run's, its pairs and reference the shared files themselves.
    for name in VARIANTS:
        run = out / name
        for file in ("config.json", "pairs.jsonl", "eval_pairs.jsonl", "reference.jsonl", "metrics.jsonl",
                     "summary.json", "final/model.safetensors", "base_eval.tokens.jsonl", "trained_eval.tokens.jsonl",
                     "pmi.html", "curves.png"):
            assert (run / file).is_file(), (name, file)
        for file in ("pairs.jsonl", "reference.jsonl", "base_eval.tokens.jsonl"):
            assert os.stat(run / file).st_ino == os.stat(out / sweep.SHARED / file).st_ino
    assert (single / "pairs.jsonl").read_bytes() == (out / sweep.SHARED / "pairs.jsonl").read_bytes()
    assert (single / "reference.jsonl").read_bytes() == (out / sweep.SHARED / "reference.jsonl").read_bytes()
    # It ends with the held-out meter of every variant against the base model, and its chart's table.
    assert "held-out meter: 3 prompts" in result.stdout
    assert all(name in result.stdout for name in VARIANTS) and "pmi" in result.stdout
    assert (out / "compare-held-out.md").is_file()
    # eval.py --compare BASE SWEEP: the sweep directory stands for its variants.
    specs = results.models_to_evaluate(SimpleNamespace(compare=[str(assets["model"]), str(out)], model=None,
                                                       revision=None))
    assert [spec["run"] for spec in specs[1:]] == [out / name for name in VARIANTS]


def test_a_sweep_samples_the_pairs_and_scores_the_reference_once(assets, tmp_path, monkeypatch):
    sampled, scored = [], []
    sample_pairs, resumable_pass = mipo.sample_pairs, runs.resumable_pass
    monkeypatch.setattr(mipo, "sample_pairs", lambda *a, **k: sampled.append(1) or sample_pairs(*a, **k))

    def counting_pass(run, path, records, batches, score, desc):
        def counted(batch):
            scored.append(len(batch))
            return score(batch)
        return resumable_pass(run, path, records, batches, counted, desc)

    monkeypatch.setattr(runs, "resumable_pass", counting_pass)
    args = args_for(assets, tmp_path / "sweep", "--loss", "sigmoid", "hinge", "--lr", "1e-3", "2e-3")
    train.main(args)
    assert len(sampled) == 1  # the training prompts (--n-eval 0: no held-out ones)
    assert sum(scored) == 8  # every pair once, for four variants
    assert all((tmp_path / "sweep" / name / "final").is_dir() for name in
               ("loss-sigmoid_lr-0.001", "loss-sigmoid_lr-0.002", "loss-hinge_lr-0.001", "loss-hinge_lr-0.002"))
    train.main(args)  # done: every variant is skipped
    assert len(sampled) == 1 and sum(scored) == 8


@pytest.mark.parametrize("flags, message", [
    (("--n", "4", "8"), "--n 4 8: a list of a setting that changes the pairs or the reference pass; run one "
                        "command per value"),
    (("--temperature", "0.7", "1.0"), "--temperature 0.7 1.0: a list of a setting that changes the pairs"),
    (("--loss", "ipo", "ipo"), "--loss ipo ipo: a value is listed twice"),
])
def test_a_sweep_refuses_a_list_that_changes_the_pairs(assets, tmp_path, flags, message):
    with pytest.raises(MipoError) as error:
        train.main(args_for(assets, tmp_path / "sweep", *flags))
    assert str(error.value).startswith(message)
    assert not (tmp_path / "sweep").exists()


def test_a_killed_sweep_resumes_to_the_same_weights(assets, swept, tmp_path):
    out = tmp_path / "sweep"
    killed = run_cli([*args_for(assets, out, *SWEEP), "--_crash-at", "train:1"])
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not (out / VARIANTS[0] / "final").exists()
    resumed = run_cli(args_for(assets, out, *SWEEP))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    for name in VARIANTS:
        a, b = final_weights(out / name), final_weights(swept[0] / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_a_sweep_draws_its_variants_on_one_set_of_axes(swept, monkeypatch):
    from test_train import drawn_panels

    out, result = swept
    assert f"curves: {out / 'curves.png'}" in result.stderr
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    drawn = drawn_panels(monkeypatch)
    sweep.plot_curves([SimpleNamespace(out=str(out / name)) for name in VARIANTS])  # what the sweep drew, again
    ((path, panels),) = drawn
    assert path == out / "curves.png"
    for title, keys in report.CURVE_PANELS:  # one line per variant and key, in the variants' order
        assert panels[title] == [[m[key] for m in metrics(out / name)] for name in VARIANTS for key in keys], title
