"""The report's verdicts across subjects and texts (quantpipe.report.subjects), on plain rows as
query.as_row makes them from MLflow runs."""
from quantpipe.report import subjects


def row(name, model, text, kld, ci, method="static", control=None, grid=None):
    metrics = {"kld_mean": kld, "kld_ci95_low": ci[0], "kld_ci95_high": ci[1],
               "delta_ppl_pct": 10 * kld}
    if grid is not None:
        metrics["grid_aligned_pct"] = grid
    return {"name": name, "method": method, "run_id": name + model + str(text),
            "params": {"model.name": model, "eval.text_file": str(text), "quant.compare": "int4",
                       "quant.control": str(control)}, "metrics": metrics}


def cell(model, text, gptq, grid):
    return [row("gptq", model, text, *gptq, control="rtn", grid=grid),
            row("rtn", model, text, 0.10, (0.09, 0.11), method="dynamic", grid=grid),
            row("nf4", model, text, 0.08, (0.07, 0.09), method="dynamic", grid=grid)]


def test_a_method_that_wins_on_one_text_only_is_named_and_the_float_subject_is_trusted():
    rows = (cell("float", None, (0.05, (0.04, 0.06)), 0.0)
            + cell("float", "builtin:ood", (0.075, (0.07, 0.085)), 0.0)
            + cell("smol", None, (0.02, (0.01, 0.03)), 78.9))
    verdicts = {(v["subject"], v["text"]): v for v in subjects.judged(rows)}
    assert verdicts[("float", subjects.DEFAULT_TEXT)]["beats_control"] is True
    assert verdicts[("float", subjects.DEFAULT_TEXT)]["beats_dynamic"] is True
    assert verdicts[("float", "builtin:ood")]["beats_control"] is True
    assert verdicts[("float", "builtin:ood")]["beats_dynamic"] is False  # overlaps nf4
    notes = subjects.notes(subjects.judged(rows), rows)
    assert any("float: gptq wins on `the eval split` only" in n for n in notes), notes
    # on the eval split the subjects rank gptq/nf4/rtn alike; make smol rank them differently
    rows = [row("nf4", "smol", None, 0.01, (0.005, 0.012), method="dynamic", grid=78.9)] + rows
    # (rows come newest first: this nf4 run is the one the report takes)
    ranking = " ".join(subjects.ranking_notes(rows))
    assert "differently" in ranking and "Trusted: **float**" in ranking, ranking
    assert "| float |" in subjects.section(rows)


def test_no_control_no_verdict():
    rows = [row("nf4", "float", None, 0.08, (0.07, 0.09), method="dynamic")]
    assert subjects.judged(rows) == []
    assert "No calibrated variant" in subjects.section(rows)


def test_a_control_of_another_weight_scheme_is_no_control():
    """The newest method run and the newest control run differ in their weight scheme (one of
    them predates a config change): no verdict, and a note that names the key to re-run for."""
    rows = cell("smol", None, (0.05, (0.04, 0.06)), 78.9)
    rows[0]["params"]["quant.backend.weights.observer"] = "minmax"   # gptq, before the change
    rows[1]["params"]["quant.backend.weights.observer"] = "mse"      # rtn, after it
    assert subjects.judged(rows) == []
    (note,) = subjects.unmatched(rows)
    assert "gptq is not judged" in note and "`quant.backend.weights.observer`" in note
    rows[1]["params"]["quant.backend.weights.observer"] = "minmax"
    assert len(subjects.judged(rows)) == 1 and subjects.unmatched(rows) == []


def test_awq_section_puts_its_scale_search_beside_its_gain_per_subject():
    """llm-compressor's plug-in section: the newest AWQ run per subject, its scale-search
    metrics (shared with the variant run) and the gain over its control from the verdicts."""
    from quantpipe.quantize import llmc_report
    from quantpipe.report.query import Selection
    rows = (cell("float", None, (0.05, (0.04, 0.06)), 0.0)
            + cell("smol", None, (0.02, (0.01, 0.03)), 78.9))
    rows[0]["metrics"] |= {"awq_mappings": 24.0, "awq_error_left_median": 0.957,
                           "awq_error_left_min": 0.80, "awq_channel_peak_median": 2.7}
    rows[3]["metrics"] |= {"awq_mappings": 90.0, "awq_error_left_median": 0.62,
                           "awq_error_left_min": 0.21, "awq_channel_peak_median": 41.0}
    sel = Selection("e", "sqlite:///x", None, [], everything=rows)
    heading, body, note = llmc_report.awq_section(sel)
    assert heading == "## AWQ's scale search, per subject"
    assert "| float | **gptq** | 24 | 2.7× | 95.7 % | 80.0 % | 2.00× on `the eval split` |" in body
    assert "| smol | **gptq** | 90 | 41.0× | 62.0 % | 21.0 % | 5.00× on `the eval split` |" in body
    assert "premise" in note
    assert llmc_report.awq_section(Selection("e", "sqlite:///x", None, [], everything=rows[1:3])
                                   ) == []


def with_windows(r, kld_per_window, sha="w"):
    r["per_window"] = {"windows_sha256": sha, "kld": list(kld_per_window)}
    return r


def test_a_paired_difference_separates_what_overlapping_intervals_cannot():
    """gptq's and its control's own intervals overlap, yet on every window gptq's KLD is lower:
    paired over the same windows it beats the control; scored on other windows (another
    digest) the verdict falls back to the overlap test."""
    hard = [0.04, 0.09, 0.06, 0.12, 0.05, 0.10, 0.07, 0.08]  # the windows' own difficulty
    rows = cell("float", None, (0.0790, (0.060, 0.095)), 0.0)
    rows[1]["metrics"] |= {"kld_mean": 0.0815, "kld_ci95_low": 0.062, "kld_ci95_high": 0.098}
    with_windows(rows[0], [k - 0.0025 + 0.0005 * (i % 2) for i, k in enumerate(hard)])
    with_windows(rows[1], [k + 0.0 for k in hard])
    with_windows(rows[2], hard[::-1])
    (v,) = subjects.judged(rows)
    assert v["beats_control"] is True
    d, low, high = subjects.paired(rows[0], rows[1])
    assert low <= d <= high < 0 and abs(d - (-0.00225)) < 1e-12
    md = subjects.section(rows)
    assert f"{d:+.4f} [{low:+.4f}, {high:+.4f}]" in md
    rows[1]["per_window"]["windows_sha256"] = "other windows"
    (v,) = subjects.judged(rows)
    assert v["beats_control"] is False and subjects.paired(rows[0], rows[1]) is None
    assert "— (overlap test)" in subjects.section(rows)


def test_three_subjects_are_ranked_pair_by_pair_on_what_each_pair_shares():
    """A third subject that ran only some variants must not hide the others' comparison: the
    default and the float subject share gptq/rtn/nf4 and are compared on them; the third
    shares only nf4 and rtn with either."""
    rows = (cell("float", None, (0.05, (0.04, 0.06)), 0.0)
            + cell("smol", None, (0.02, (0.01, 0.03)), 78.9)
            + [row("rtn", "gemma", None, 0.10, (0.09, 0.11), method="dynamic", grid=0.0),
               row("nf4", "gemma", None, 0.08, (0.07, 0.09), method="dynamic", grid=0.0)])
    notes = subjects.ranking_notes(rows)
    assert len(notes) == 3, notes
    (both,) = [n for n in notes if "float:" in n and "smol:" in n]
    assert "rank the 3 shared variants alike" in both and "gptq < nf4 < rtn" in both
    assert all("2 shared variants alike" in n for n in notes if "gemma:" in n)
