"""report.to_html() / --report-html: one self-contained page, the graphs drawn by dot, opened in Chromium."""
import re
import shutil
import subprocess

import pytest
import torch
import torch.nn as nn

import rewrite
from rewrite import report_html
from rewrite.cli import main
from rewrite.testing import randomize_bn


class Net(nn.Module):
    """A foldable conv+BN, a residual add, and a BN after a concat that stays (a refused site)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.kept = nn.BatchNorm2d(8)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        return self.kept(torch.cat([x, self.conv2(x)], 1))


def page(tmp_path):
    model, x = randomize_bn(Net()).eval(), torch.randn(1, 3, 8, 8)
    _, report = rewrite.apply(model, ["fold_bn", "cleanup"], example_inputs=x, verify=True, return_report=True)
    return report, report.to_html()


needs_dot = pytest.mark.skipif(shutil.which("dot") is None, reason="graphviz's dot is not installed "
                                                                    "(scripts/setup_env.sh installs it)")


@needs_dot
def test_the_page_is_self_contained_and_marks_rewritten_and_refused_nodes(tmp_path):
    report, text = page(tmp_path)
    assert text.count("<svg") == 2 and "http" not in re.sub(r'xmlns(:\w+)?="[^"]*"', "", text).replace(
        "http://www.w3.org", "")  # no link to fetch: inline SVG only (the SVG namespace is no fetch)
    assert "<script" not in text and "<link" not in text
    assert "fold_bn_into_conv 1" in text and "original float32 error" in text
    assert report_html.REWRITTEN_COLOR in text and report_html.REFUSED_COLOR in text
    assert "kept reads concat" in text  # the refused BN, with its reason, in the refusal table
    before, after = text.split("Graph after")
    assert 'id="n_bn"' in before and 'id="n_bn"' not in after  # the BN folded away


def test_without_dot_the_page_says_so_and_lists_the_nodes(tmp_path, monkeypatch):
    monkeypatch.setattr(report_html.shutil, "which", lambda name: None)
    _, text = page(tmp_path)
    assert "<svg" not in text and "was not found" in text and "apt-get install graphviz" in text
    assert "<li>batch_norm kept</li>" in text


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@needs_dot
def test_the_page_renders_the_graph_in_headless_chromium(tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("chromium is not installed and scripts/setup_env.sh could not install it")
    out = tmp_path / "report.html"
    assert main(["apply", "rewrite.demo:default_model", "--passes", "fold_bn,cleanup", "--verify",
                 "--report-html", str(out), "--dry-run"]) == 0
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
             f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([browser, *flags, "--dump-dom", out.as_uri()], capture_output=True, text=True,
                         timeout=120).stdout
    # the browser parsed both graphs as SVG, with a drawn shape for every node
    assert dom.count("<svg") == 2
    nodes = re.findall(r'<g id="n_[^"]*" class="node">\s*<title>[^<]*</title>\s*<(path|polygon|ellipse)', dom)
    assert len(nodes) >= 4
    shot = tmp_path / "shot.png"
    subprocess.run([browser, *flags, "--window-size=1200,1600", f"--screenshot={shot}", out.as_uri()],
                   capture_output=True, timeout=120)
    assert shot.stat().st_size > 10_000
