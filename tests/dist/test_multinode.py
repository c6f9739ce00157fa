"""Multi-node, proven on one box: two `deepspeed` launchers acting as two nodes of one rank each
(hostfile with two host lines, `--no_ssh --node_rank N`, one master address and port) train exactly
like one launcher with two ranks on one node: the same global ranks run the same arithmetic and gloo
reduces in the same order, so losses, grad norms and validation losses are bit-equal."""

from __future__ import annotations

import json

import pytest
import yaml

from megalong.engine import checkpoint as ckpt
from tests.assets import run_launcher, run_nodes, step_metric, tiny_run_config

pytestmark = pytest.mark.dist


def test_two_nodes_of_one_rank_equal_one_node_of_two(assets, tmp_path):
    runs = {}
    for name in ("one_node", "two_nodes"):
        cfg = tiny_run_config(assets, tmp_path / name, train={"max_steps": 4}, checkpoint={"save_interval": 0})
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
        runs[name] = tmp_path / name
    res = run_launcher(["--num_gpus", "2"], ["--config", str(tmp_path / "one_node.yaml")])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]

    hostfile = tmp_path / "hostfile"  # two "nodes" on this machine: the launcher wants distinct names
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    nodes = run_nodes(hostfile, 2, ["--config", str(tmp_path / "two_nodes.yaml")], tmp_path)
    for n, (code, out) in enumerate(nodes):
        assert code == 0, out[-4000:]
        assert f"nnodes=2, num_local_procs=1, node_rank={n}" in out
    assert "run directory:" in nodes[0][1]  # rank 0 lives on node 0

    for key in ("loss", "grad_norm", "val_loss", "tokens"):
        one, two = step_metric(runs["one_node"], key), step_metric(runs["two_nodes"], key)
        assert one and one == two, (key, one, two)
    assert step_metric(runs["two_nodes"], "tokens")[1] == 2 * 2 * 128  # 2 ranks x micro 2 x 128 tokens
    ckpts = runs["two_nodes"] / "checkpoints"
    meta = ckpt.read_meta(ckpts, (ckpts / "latest").read_text())
    assert meta["world_size"] == 2 and meta["step"] == 4
    for r in (0, 1):  # each node wrote its own rank's partition and RNG state into the one directory
        assert list((ckpts / meta["tag"]).glob(f"zero_pp_rank_{r}_*optim_states.pt"))
        assert list((ckpts / meta["tag"]).glob(f"rng_rank{r}.*"))
    beats = [json.loads(p.read_text()) for p in sorted((runs["two_nodes"] / "heartbeats").glob("rank*.json"))]
    assert [(b["rank"], b["state"], b["step"]) for b in beats] == [(0, "done", 4), (1, "done", 4)]
