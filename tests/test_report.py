"""Reports render themselves at a fixed width and serialise to JSON."""

from __future__ import annotations

import json

from rich.console import Console

from repconv.driver.report import FuseReport, ModelCounts
from repconv.fold.reasons import Skip
from repconv.pipeline import FuseOutcome
from repconv.rewrite.record import RewriteRecord
from repconv.verify.report import VerifyReport

EXPECTED_AT_80 = """\
note: model was in train mode; fused its eval-mode behaviour
2 rewrites: 1 multi-branch, 1 conv+bn
            before  after
modules         10      5
convs            3      2
batchnorms       3      1
parameters   1,234  1,200
rewrites
where         kind          ops  kernel  groups  MACs before→after
stage.0.conv  multi-branch  5    3x3     1       1,000→900
head.conv     conv+bn       2    1x1     2       64→60
left unfused: 1 BatchNorm(s) (1 next to a conv)
  1 x borders would differ: first pre_bn: a bias before a zero-padded conv (e.g.
BN before a padded conv): borders differ
every op left (1):
  pre_bn: a bias before a zero-padded conv (e.g. BN before a padded conv):
borders differ
verification passed: max scale-relative error 2.50e-08 (tolerance 1e-05), max
abs error 1.50e-07, 1 output(s) x 3 input(s)"""


def _report(passed: bool = True) -> FuseReport:
    return FuseReport(
        rewrites=[
            RewriteRecord("", "stage.0.conv", "multi-branch",
                          ["Conv2d", "BatchNorm2d", "Conv2d", "BatchNorm2d", "add"], [3, 3], 1,
                          1000, 900, 1e-16),
            RewriteRecord("", "head.conv", "conv+bn", ["Conv2d", "BatchNorm2d"], [1, 1], 2, 64,
                          60, 0.0),
        ],
        skipped=[Skip("pre_bn", "a bias before a zero-padded conv (e.g. BN before a padded "
                               "conv): borders differ", "batchnorm")],
        notes=["model was in train mode; fused its eval-mode behaviour"],
        before=ModelCounts(10, 3, 3, 1234),
        after=ModelCounts(5, 2, 1, 1200),
        verification=VerifyReport(passed, 1.5e-7, 2.5e-8, 1e-5, 0.0, 3, 0, [[1, 3, 8, 8]], 1,
                                  "output[0]"),
        show_rewrites=True,
    )


def _render(renderable: object, width: int = 80) -> str:
    console = Console(width=width, record=True, color_system=None)
    console.print(renderable)
    return "\n".join(line.rstrip() for line in console.export_text().splitlines())


def test_fuse_report_renders_at_fixed_width() -> None:
    assert _render(_report()) == EXPECTED_AT_80


def test_failed_verification_renders_failed() -> None:
    assert "verification FAILED: max scale-relative error 2.50e-08" in _render(_report(False))


def test_fuse_report_serialises_to_json_with_the_same_numbers() -> None:
    data = json.loads(json.dumps(_report().to_dict()))
    assert data["rewrites_by_kind"] == {"multi-branch": 1, "conv+bn": 1}
    assert data["before"]["batchnorms"] == 3 and data["after"]["batchnorms"] == 1
    assert data["skipped"][0]["where"] == "pre_bn"
    assert data["verification"]["max_rel_error"] == 2.5e-8
    assert "show_rewrites" not in data


def test_fuse_outcome_says_what_was_written() -> None:
    outcome = FuseOutcome("in.pt", "out.pt", ["state_dict under 'state_dict'"], _report(),
                          written="fused state_dict")
    text = _render(outcome, width=100)
    assert text.splitlines()[0] == "in.pt: state_dict under 'state_dict'"
    assert text.splitlines()[-1] == "wrote out.pt (fused state_dict)"
    assert outcome.to_dict()["ok"] is True
    failed = FuseOutcome("in.pt", "out.pt", [], _report(passed=False))
    assert _render(failed).splitlines()[-1] == "nothing written to out.pt"
    assert failed.to_dict()["ok"] is False
