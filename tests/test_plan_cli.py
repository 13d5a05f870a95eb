""""Will it fit?" without a GPU: `python -m ebft_engine plan --gpu CARD` plans from the model's config alone."""
from __future__ import annotations

import io

import pytest

from ebft_engine.cli import main

PAPER = "assets/presets/llama-7b-paper.yaml"


def _plan(*args: str, capsys=None) -> tuple[int, str]:
    out = io.StringIO()
    code = main(["plan", "--config", PAPER, *args], out=out)
    return code, out.getvalue()


@pytest.mark.parametrize("card,precision,kernel", [
    ("t4", "weights float16, compute float16 with a gradient scaler", "memory-efficient"),
    ("v100-16", "weights float16, compute float16 with a gradient scaler", "memory-efficient"),
    ("rtx4080-16", "weights bfloat16, compute bfloat16", "flash attention"),
    ("a100-40", "weights bfloat16, compute bfloat16", "flash attention"),
    ("h100-80", "weights bfloat16, compute bfloat16", "flash attention"),
])
def test_llama_7b_at_the_paper_settings_on_each_card(card, precision, kernel):
    code, text = _plan("--gpu", card)
    assert code == 0, text
    assert f"precision: {precision}" in text and f"attention kernel: {kernel}" in text
    assert "| ebft | 10.57 GiB |" in text and text.rstrip().splitlines()[-1].startswith("verdict: fits")
    assert "huggyllama--llama-7b.json" in text  # the shape shipped for the preset's hub id: no network


def test_a_card_too_small_gets_the_lever_that_fits_and_exit_1():
    code, text = _plan("--gpu-memory", "10", "--activations", "device")
    assert code == 1
    assert text.rstrip().splitlines()[-1] == (
        "verdict: does not fit: the ebft phase needs about 10.57 GiB on the cuda device, which has 10.00 GiB to "
        "give; try --batch-size 4 (planned device peak 9.08 GiB)")


def test_a_12_gib_card_keeps_the_activations_on_the_device():
    """The planner counted the propagated outputs as live during training (12.57 GiB for LLaMA-7B) and refused
    12 GiB cards; the third stream only exists once the training state is gone (bench/memory.py --block-7b)."""
    code, text = _plan("--gpu-memory", "12", "--activations", "device")
    assert code == 0 and "calibration activations: on the device" in text and "| ebft | 10.57 GiB |" in text


def test_an_unknown_card_is_one_line_and_exit_2(capsys):
    assert main(["plan", "--config", PAPER, "--gpu", "p100"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --gpu: 'p100' is not a card this planner knows; use one of t4, v100-16, rtx4080-16, "
                   "a100-40, h100-80; for any other card give its memory with --gpu-memory GiB, and --gpu t4 or "
                   "v100-16 as its kind if it is older than compute capability 8.0"]


def test_an_unknown_card_is_refused_with_a_memory_size_too(capsys):
    """--gpu p100 --gpu-memory 16 planned a P100 as compute capability 8.0 (bf16, flash attention)."""
    out = io.StringIO()
    assert main(["plan", "--config", PAPER, "--gpu", "p100", "--gpu-memory", "16"], out=out) == 2
    assert out.getvalue() == ""
    assert capsys.readouterr().err.startswith("error: --gpu: 'p100' is not a card this planner knows;")


def test_a_memory_size_alone_says_which_capability_it_assumes():
    code, text = _plan("--gpu-memory", "16")
    assert code == 0
    assert text.splitlines()[1] == ("card: a 16 GiB card, 16.00 GiB, compute capability 8.0 assumed (8.0 or newer: "
                                    "bf16 and flash attention; for an older card add --gpu with a card of its kind, "
                                    "t4 or v100-16)")
    code, text = _plan("--gpu", "v100-16", "--gpu-memory", "32")  # an older card's kind, with its size
    assert text.splitlines()[1] == "card: a 32 GiB card (v100-16), 32.00 GiB, compute capability 7.0"
    assert "compute float16 with a gradient scaler" in text and "assumed" not in text


def test_a_card_name_matches_in_any_case():
    assert _plan("--gpu", "T4")[1] == _plan("--gpu", "t4")[1]


def test_no_card_at_all_is_a_sentence(capsys):
    assert main(["plan", "--config", PAPER]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: --gpu: no card given; name one with --gpu (t4, v100-16, rtx4080-16, a100-40, h100-80), or give "
        "any other card's memory with --gpu-memory GiB"]


def test_a_local_model_folder_is_planned_from_its_config(tiny_model_dir):
    out = io.StringIO()
    assert main(["plan", "--model", str(tiny_model_dir), "--gpu", "a100-40"], out=out) == 0
    assert "2 blocks" in out.getvalue() and "verdict: fits" in out.getvalue()


@pytest.mark.parametrize("card", ["t4", "h100-80"])
def test_the_evaluation_states_stay_on_a_card_with_room_for_them(card):
    """LLaMA-7B's 2.59 GiB of WikiText-2 states (as planned) fit beside the evaluation's block and head even on a
    T4: the eval phase holds them on the device (5.06 GiB) and the host only the model (13.02 GiB, not 15.61)."""
    code, text = _plan("--gpu", card)
    assert code == 0 and "evaluation hidden states: on the device" in text
    assert "| eval | 5.06 GiB | 13.02 GiB |" in text


def test_the_evaluation_states_stay_on_the_host_when_the_card_has_no_room():
    code, text = _plan("--gpu-memory", "5")
    assert "evaluation hidden states: on the host" in text
    assert "| eval | 2.60 GiB | 17.02 GiB |" in text  # the model and 4 GiB pinned for 2.59 GiB of states


def test_zero_shot_tasks_add_their_phase_and_say_how_the_model_is_held():
    """Llama-3-8B (14.96 GiB in float16) cannot go whole to a T4 for lm-eval: its blocks stream and it fits;
    LLaMA-7B goes whole to an A100; without tasks there is no zero-shot phase."""
    code, text = _plan("--gpu", "t4", "--model", "meta-llama/Meta-Llama-3-8B", "--zeroshot", "boolq,hellaswag")
    assert code == 0 and "zero-shot (lm-eval): blocks offloaded to host memory" in text
    assert "| zeroshot | 10.48 GiB | 15.43 GiB |" in text  # with the repeated keys and values of a T4 (0.25 GiB)
    code, text = _plan("--gpu", "a100-40", "--zeroshot", "boolq")
    assert code == 0 and "zero-shot (lm-eval): the whole model on the device" in text
    assert "| zeroshot | 15.90 GiB |" in text
    assert "zero" not in _plan("--gpu", "t4")[1]


def test_a_host_too_small_for_the_model_itself_is_told_how_much_it_needs():
    """The model and runtime alone take 13.02 GiB: no flag brings LLaMA-7B under 12 GiB, so none is offered."""
    code, text = _plan("--gpu", "t4", "--host-memory", "12")
    assert code == 1
    verdict = text.rstrip().splitlines()[-1]
    assert verdict.endswith("no setting brings it under 12.00 GiB (the model and the runtime alone take 13.02 GiB): "
                            "use a machine with at least 13.78 GiB of host memory (this plan's host peak, rounded up)")
    assert "--nsamples" not in verdict and "--seqlen" not in verdict and "try" not in verdict
    code, text = _plan("--gpu", "t4", "--host-memory", "13.78")  # the advice, followed, fits
    assert code == 0, text


@pytest.mark.parametrize("activations,lever", [(None, "--batch-size 4"),
                                               ("host", "--activations device --batch-size 4")])
def test_a_short_host_gets_a_lever_that_fits_both_memories(activations, lever):
    """On a 10 GiB card the activations go to the host (19.77 GiB there); with 16 GiB of RAM the advice is the
    smaller batch that keeps them on the device, and the plan with that lever fits both."""
    given = ("--gpu-memory", "10", "--host-memory", "16") + (("--activations", activations) if activations else ())
    code, text = _plan(*given)
    assert code == 1 and "calibration activations: on the host" in text
    verdict = text.rstrip().splitlines()[-1]
    assert (f"; try {lever} (planned device peak 9.08 GiB, host peak 13.77 GiB), or use a machine with at least "
            "19.78 GiB of host memory" in verdict)
    code, text = _plan(*given, *lever.split())
    assert code == 0 and "calibration activations: on the device" in text


@pytest.mark.parametrize("flag,value", [("--host-memory", "0"), ("--host-memory", "-3"), ("--host-memory", "nan"),
                                        ("--gpu-memory", "nan"), ("--gpu-memory", "inf"), ("--gpu-memory", "abc"),
                                        ("--gpu-memory", "0")])
def test_a_memory_amount_that_is_not_one_is_one_line_and_exit_2(flag, value, capsys):
    """0 was silently ignored, -3 planned as "-3.00 GiB is available", nan and inf raised a traceback, and text
    dumped argparse's usage: each is now the flag, the value and the fix."""
    given = ["--gpu", "t4"] if flag == "--host-memory" else []
    out = io.StringIO()
    assert main(["plan", "--config", PAPER, *given, flag, value], out=out) == 2
    assert out.getvalue() == ""
    example = "32" if flag == "--host-memory" else "24"
    assert capsys.readouterr().err.splitlines() == [
        f"error: {flag}: {value!r} is not an amount of memory; give a positive number of GiB, e.g. {flag} {example}"]


def test_an_unknown_zero_shot_task_is_refused_by_name_as_a_run_refuses_it(capsys):
    """The plan read --zeroshot notatask and planned it (exit 0); a run refuses it before any pruning. Names only:
    lm-eval's task index, no data set read (the known task beside it passes)."""
    out = io.StringIO()
    assert main(["plan", "--config", PAPER, "--gpu", "t4", "--zeroshot", "boolq,notatask"], out=out) == 2
    assert out.getvalue() == ""
    assert capsys.readouterr().err.splitlines() == [
        "error: eval.zeroshot: unknown lm-eval task 'notatask'; use lm-eval task names such as boolq, rte, "
        "hellaswag, winogrande, arc_easy, arc_challenge, openbookqa, or add your task's YAML folder with "
        "eval.zeroshot_include"]


@pytest.mark.parametrize("card", ["t4", "v100-16", "rtx4080-16"])
def test_the_paper_preset_offloads_zero_shot_on_every_16_gb_card(card):
    """README and docs/evaluation.md quote these lines: 12.55 GiB of weights and a 3.35 GiB batch exceed 92% of
    any 16 GB card, so the blocks stream (slower), and the device holds 4.21 GiB."""
    code, text = _plan("--gpu", card, "--zeroshot", "boolq")
    assert code == 0
    assert ("zero-shot (lm-eval): blocks offloaded to host memory, streamed to the device as they run (the model "
            "and lm-eval's batch would not fit; slower: every batch copies every block over)") in text
    assert "| zeroshot | 4.21 GiB | 13.02 GiB |" in text


def test_a_reader_that_closes_the_pipe_ends_the_plan_quietly():
    """`plan ... | head` ended with a BrokenPipeError traceback; now nothing on stderr and a shell's SIGPIPE status."""
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-m", "ebft_engine", "plan", "--config", PAPER, "--gpu", "t4"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    child.stdout.close()  # long before the plan is written: importing torch alone takes seconds
    stderr = child.stderr.read().decode()
    assert child.wait(timeout=120) == 141 and stderr == ""


def test_an_output_that_cannot_be_written_is_one_line_not_a_traceback():
    """`plan ... > /dev/full` ended with an OSError traceback; now one line naming why, and exit 2."""
    import subprocess
    import sys

    with open("/dev/full", "w") as full:
        child = subprocess.run([sys.executable, "-m", "ebft_engine", "plan", "--config", PAPER, "--gpu", "t4"],
                               stdout=full, stderr=subprocess.PIPE, timeout=120)
    stderr = child.stderr.decode()
    assert child.returncode == 2
    assert stderr.count("\n") == 1 and "No space left on device" in stderr and "Traceback" not in stderr
