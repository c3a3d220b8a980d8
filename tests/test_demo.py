"""jobs/demo.py's verdict line: a speed-up only where drafts were verified."""

from jobs.demo import summary_line


def test_a_ratio_is_printed_only_beside_verified_drafts():
    drafting = summary_line("bfloat16", 15.1, 27.8, 410, 793)
    assert "(1.84x)" in drafting and "410 of 793" in drafting
    plain = summary_line("bfloat16", 15.1, 15.3, 0, 0)
    assert "x)" not in plain and "0 of 0" not in plain and "verified no drafts" in plain
    assert "plain 15.1 tok/s, SDSAT 15.3 tok/s" in plain
