"""bench/masks_table.py groups measured runs by starting masks and setting, and says when two runs disagree."""
import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("masks_table", ROOT / "bench" / "masks_table.py")
masks_table = importlib.util.module_from_spec(spec)
spec.loader.exec_module(masks_table)


def summary(tmp_path, name, ppl, seconds, sha="aa", method="wanda", sparsity=0.7, windows=16):
    s = {"config": {"prune": {"method": method, "sparsity": sparsity, "pattern": "unstructured"},
                    "ebft": {"epochs": 5}},
         "calibration": {"source": "self", "nsamples": 32, "seqlen": 512},
         "eval": {"source": "file:/x/wiki.test.raw", "seqlen": 1024, "windows": windows},
         "mask_sha256": {method: sha}, "ppl": ppl, "seconds": seconds, "lora": None}
    path = tmp_path / name
    path.write_text(json.dumps(s))
    return path


def test_cells_merge_first_file_wins_and_disagreement_warns(tmp_path):
    a = summary(tmp_path, "a.json", {"wanda": 1000.0, "ebft-gp": 150.0, "ebft-mask-gp": 135.0},
                {"ebft:ebft-gp": 180.0, "ebft:ebft-mask-gp": 225.0})
    b = summary(tmp_path, "b.json", {"wanda": 1000.0, "ebft": 175.0, "ebft-gp": 151.0},
                {"ebft:ebft": 170.0, "ebft:ebft-gp": 999.0})
    groups, warnings = masks_table.group([a, b])
    g = groups[("wanda", "70%", 5)]
    assert g["ppl"] == {"wanda": 1000.0, "ebft-gp": 150.0, "ebft-mask-gp": 135.0, "ebft": 175.0}
    assert g["seconds"] == {"ebft-gp": 180.0, "ebft-mask-gp": 225.0, "ebft": 170.0}
    assert g["files"] == ["a.json", "b.json"]
    assert len(warnings) == 1 and "ebft-gp" in warnings[0] and "151.00" in warnings[0]
    text = masks_table.render(groups, warnings)
    assert "| wanda | 70% | 5 | 1000.00 | 175.00 |  | 150.00 | 135.00 |" in text
    assert "-10.0%" in text and "1.25×" in text


def test_runs_on_other_masks_or_data_are_left_out(tmp_path):
    a = summary(tmp_path, "a.json", {"wanda": 1000.0, "ebft": 175.0}, {})
    other_masks = summary(tmp_path, "b.json", {"wanda": 900.0, "ebft-gp": 1.0}, {}, sha="bb")
    other_eval = summary(tmp_path, "c.json", {"wanda": 1000.0, "ebft-gp": 2.0}, {}, windows=8)
    groups, warnings = masks_table.group([a, other_masks, other_eval])
    assert groups[("wanda", "70%", 5)]["ppl"] == {"wanda": 1000.0, "ebft": 175.0}
    assert [w.split()[1] for w in warnings] == ["b.json", "c.json"]


def test_missing_file_is_one_line_and_exit_2(tmp_path, capsys):
    assert masks_table.main([str(tmp_path / "nope.json"), "--out", str(tmp_path / "t.md")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "summaries" in err and "nope.json" in err


def test_untimed_runs_give_perplexities_but_no_seconds(tmp_path):
    quiet = summary(tmp_path, "quiet.json", {"wanda": 1000.0, "ebft": 175.0}, {"ebft:ebft": 200.0})
    shared = summary(tmp_path, "shared.json", {"wanda": 1000.0, "ebft-gp": 150.0}, {"ebft:ebft-gp": 900.0})
    groups, _ = masks_table.group([quiet, shared], untimed=frozenset({shared}))
    g = groups[("wanda", "70%", 5)]
    assert g["ppl"]["ebft-gp"] == 150.0 and g["seconds"] == {"ebft": 200.0}


def test_a_time_ratio_only_within_one_run(tmp_path):
    one = summary(tmp_path, "one.json", {"wanda": 1000.0, "ebft": 175.0, "ebft-mask": 165.0, "ebft-mask-gp": 135.0},
                  {"ebft:ebft": 200.0, "ebft:ebft-mask": 220.0, "ebft:ebft-mask-gp": 300.0})
    other = summary(tmp_path, "other.json", {"wanda": 1000.0, "ebft-gp": 150.0}, {"ebft:ebft-gp": 100.0})
    text = masks_table.render(*masks_table.group([one, other]))
    row = next(line for line in text.splitlines() if line.startswith("| wanda | 70% | 5 | 200 |"))
    assert row == "| wanda | 70% | 5 | 200 | 220 | 100 | 300 |  | 1.10× |  |"  # ebft-gp was timed in another run


def test_files_that_are_not_summaries_are_one_line_and_exit_2(tmp_path, capsys):
    real = json.loads(summary(tmp_path, "real.json", {"wanda": 1.0}, {}).read_text())
    del real["seconds"]
    cases = {"text.json": "not json", "empty.json": "{}", "list.json": "[]", "noseconds.json": json.dumps(real)}
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
        assert masks_table.main([str(tmp_path / name), "--out", str(tmp_path / "t.md")]) == 2, name
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: summaries: ") and name in err, err
    assert not (tmp_path / "t.md").exists()


def test_a_run_that_did_not_finish_is_used_with_a_warning_and_an_empty_first_run_is_harmless(tmp_path):
    empty = summary(tmp_path, "empty.json", {}, {})
    other = summary(tmp_path, "other.json", {"wanda": 1.0}, {}, sha="bb")
    failed = json.loads(summary(tmp_path, "failed.json", {"wanda": 1.0, "ebft": 0.5}, {}).read_text())
    failed["status"] = "failed"
    (tmp_path / "failed.json").write_text(json.dumps(failed))
    groups, warnings = masks_table.group([empty, other, tmp_path / "failed.json"])
    assert groups[("wanda", "70%", 5)]["ppl"] == {"wanda": 1.0, "ebft": 0.5}
    assert "other.json differs from empty.json" in warnings[0]
    assert "failed.json has status failed" in warnings[1]


def test_the_plain_command_rebuilds_the_committed_table(tmp_path):
    out = tmp_path / "t.md"
    assert masks_table.main(["--out", str(out)]) == 0
    assert out.read_text() == (ROOT / "bench" / "results" / "smollm2_masks_table.md").read_text()
