"""A reason for every site left: BNs fold_bn keeps, adds remove_residual keeps, partial branch merges;
node names and module paths in to_dict / --report-json; refusals grouped by reason in the table."""
import json

import torch
import torch.nn as nn
from hypothesis import given, settings

import rewrite
from rewrite.cli import main
from rewrite.frontends.fx import import_module
from rewrite.testing import random_networks, randomize_bn


def names(entries) -> set[str]:
    return {n for e in entries for n in e.node_names}


@settings(max_examples=30)
@given(random_networks(max_steps=10))
def test_every_bn_and_add_is_rewritten_or_refused_with_a_reason(net_and_input):
    net, x = net_and_input
    graph = import_module(net, x)
    bns = {n.name for n in graph.nodes if n.kind == "batch_norm"}
    adds = {n.name for n in graph.nodes if n.kind == "add"}
    _, report = rewrite.apply(net, ["fold_bn", "remove_residual"], example_inputs=x, return_report=True)
    fold = report["fold_bn"].result
    folded, kept = names(fold.rewritten) & bns, names(fold.refused) & bns
    assert len(folded) + len(kept) == len(bns) and not folded & kept, (bns, folded, kept)
    assert all(r.reason for r in fold.refused)

    residual = report["remove_residual"].result
    left = adds - names(fold.rewritten)  # adds of a constant fold into the conv before them
    merged, refused = names(residual.rewritten) & left, names(residual.refused) & left
    assert len(merged) + len(refused) == len(left) and not merged & refused, (left, merged, refused)


class DenseLike(nn.Module):
    """BNs after a concat, an add and a pool, and before an attention-like matmul: none can fold."""

    def __init__(self, c=4, blocks=5):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(c * (i + 1), c, 3, padding=1) for i in range(blocks))
        self.norms = nn.ModuleList(nn.BatchNorm2d(c * (i + 2)) for i in range(blocks))
        self.after_add = nn.BatchNorm2d(c)
        self.after_pool = nn.BatchNorm2d(c)

    def forward(self, x):
        for conv, norm in zip(self.convs, self.norms):
            x = torch.relu(norm(torch.cat([x, conv(x)], 1)))
        y = x[:, :4] + x[:, 4:8]
        y = self.after_add(y)
        y = self.after_pool(nn.functional.avg_pool2d(y, 2))
        q = y.flatten(2)
        return torch.softmax(q @ q.transpose(1, 2), -1)


def dense_like():
    return randomize_bn(DenseLike()).eval(), torch.randn(1, 4, 8, 8)


def test_bns_left_after_concat_add_and_pool_each_have_a_reason_and_the_table_groups_them():
    model, x = dense_like()
    _, report = rewrite.apply(model, ["fold_bn"], example_inputs=x, return_report=True)
    refused = report["fold_bn"].result.refused
    assert {r.node for r in refused} == {f"norms.{i}" for i in range(5)} | {"after_add", "after_pool"}
    by_module = {r.node: r.reason for r in refused}
    assert "reads concat" in by_module["norms.3"] and "reads add" in by_module["after_add"]
    assert "avg_pool2d" in by_module["after_pool"]
    text = str(report)
    assert "refused (7), by reason:" in text
    assert "5 x fold_bn/fold_bn: <site> reads concat cat and is read by relu" in text
    assert text.count("\n   ") < 7  # grouped: fewer lines than refusals


def test_a_partial_branch_merge_reports_the_branches_left():
    class TwoGroups(nn.Module):
        def __init__(self):
            super().__init__()
            self.a3, self.a1 = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)
            self.pre = nn.Conv2d(4, 4, 1)
            self.b3, self.b5 = nn.Conv2d(4, 4, 3, padding=2, dilation=2), nn.Conv2d(4, 4, 5, padding=2)

        def forward(self, x):
            y = torch.relu(self.pre(x))
            return self.a3(x) + self.a1(x) + self.b3(y) + self.b5(y)

    model, x = TwoGroups().eval(), torch.randn(1, 4, 8, 8)
    _, report = rewrite.apply(model, ["fuse_branches"], example_inputs=x, verify=True, return_report=True)
    result = report["fuse_branches"].result
    assert result.counts["fuse_parallel_branches"] == 1
    assert len(result.refused) == 1
    refusal = result.refused[0]
    assert "branches b3, b5" in refusal.reason and "not merged with the rest" in refusal.reason
    assert "dilation" in refusal.reason and refusal.modules == ("b3", "b5")


def test_to_dict_and_report_json_carry_rule_node_names_and_modules(tmp_path):
    model, x = dense_like()
    _, report = rewrite.apply(model, ["fold_bn"], example_inputs=x, return_report=True)
    entry = report.to_dict()["passes"][0]
    assert not entry["rewritten"]
    refusal = next(r for r in entry["refused"] if r["node"] == "after_pool")
    assert refusal["modules"] == ["after_pool"] and refusal["node_names"] == ["after_pool"] and refusal["reason"]
    assert entry["refused_by_reason"][0]["count"] == 5
    out = tmp_path / "report.json"
    assert main(["apply", "torchvision.models:densenet121", "--passes", "fold_bn", "--input-shape", "1,3,32,32",
                 "--report-json", str(out), "--dry-run"]) == 0
    data = json.loads(out.read_text())["passes"][0]
    assert len(data["refused"]) > 50 and all(r["modules"] and r["node_names"] for r in data["refused"])
    folds = data["rewritten"]
    assert folds and all(len(r["node_names"]) == 2 and r["rule"] == "fold_bn_into_conv" for r in folds)
    assert folds[0]["modules"] == ["features.conv0", "features.norm0"] or folds[0]["modules"][::-1] == \
        ["features.conv0", "features.norm0"]


def test_reason_templates_take_out_whole_site_names_only():
    from rewrite.pass_manager import Refused
    from rewrite.report import reason_template

    short = Refused("r", "g", "grouped conv g keeps its groups equal; g.weight is read by gate_1", ("g",), ("g",))
    assert reason_template(short) == "grouped conv <site> keeps its groups equal; <site>.weight is read by gate"
    other = Refused("r", "h", "grouped conv h keeps its groups equal; h.weight is read by gate_7", ("h",), ("h",))
    assert reason_template(other) == reason_template(short)  # like refusals read alike
