"""The GPU benchmarks' CPU smoke modes: the scripts run end to end and write readable reports (they
measure nothing on the CPU; the figures come from the H200)."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args, tmp_path, timeout, **extra_env):
    # no compiled-graph cache: a graph loaded from an earlier run skips quantune's inductor pass and its count
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT, TORCHINDUCTOR_FX_GRAPH_CACHE="0", **extra_env)
    done = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def test_generate_benchmark_checks_the_graph_loop_against_eager_steps(tmp_path):
    out = tmp_path / "gen"
    _run(["eval.bench_generate", "--smoke", "--contenders", "bf16,rtn-4", "--new-tokens", "5", "--compile",
          "--out", str(out)], tmp_path, 600)
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [r["contender"] for r in rows] == ["bf16", "rtn-4"]
    for r in rows:  # without a GPU the "graph" loop runs the same steps eagerly: all tokens agree
        assert r["graph_tokens_match_static_eager"] == 5 and r["generate_tokens_match_static_eager"] == 5
        assert "compile_error" not in r, r.get("compile_error")
        assert r["compiled_logits_rel_diff"] < 0.05  # the compiled model computes the same (up to rounding)
        assert r["graph_breaks"] == 0  # quantune's layers are custom ops in the graph, not graph breaks
    assert rows[1]["shared_input_groups"] == 4  # q/k/v and gate/up of each of the two layers share their input
    assert rows[1]["one_launch_groups"] == 0  # the one-launch GEMV serves CUDA inputs only
    md = out.with_suffix(".md").read_text()
    assert "graph = static eager" in md and "compiled + CUDA graph tokens/s" in md


def test_quantize_benchmark_measures_its_byte_floor_and_baselines(tmp_path):
    """eval/bench_quantize.py at a tiny shape on the CPU: the streamed pass, the same bytes moved without the
    arithmetic (every source byte read, every quantized weight sent to the device, every output written), and the
    arithmetic alone per layer type for kashin, rtn and (where bitsandbytes imports) NF4."""
    out = tmp_path / "bq"
    _run(["eval.bench_quantize", "--device", "cpu", "--shape", "tiny", "--out", str(out)], tmp_path, 300)
    s = json.loads(out.with_suffix(".json").read_text())
    assert s["layers"] == 2 and s["wall_seconds"] > 0 and s["device_copy_GBps"] is None  # no CUDA copy here
    # the pass again with reading and writing in threads beside the arithmetic: the same files
    assert s["wall_seconds_overlapped"] > 0 and s["overlapped_files_equal"] is True
    kinds = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert set(s["by_layer_type"]) == kinds and all(e["layers"] == 2 for e in s["by_layer_type"].values())
    floor = s["io_floor"]
    assert floor["read_bytes"] == s["read_bytes"]  # every tensor of the source shards
    assert floor["to_device_bytes"] == 2 * s["quantized_weights"]  # the bf16 weights that get quantized
    assert 0 < floor["from_device_bytes"] < floor["to_device_bytes"] / 3  # 4-bit codes and coefficients
    assert 0.9 * s["written_bytes"] < floor["write_bytes"] <= s["written_bytes"]  # files: tensors + headers
    assert floor["seconds"] == pytest.approx(sum(floor[f"{k}_seconds"] for k in
                                                 ("read", "to_device", "from_device", "write")))
    assert s["wall_over_io_floor"] == pytest.approx(s["wall_seconds"] / floor["seconds"])
    arith = s["arithmetic_alone"]
    assert arith["contenders"][:2] == ["kashin", "rtn"] and set(arith["by_layer_type"]) == kinds
    assert "kashin, GPU's torch path" in arith["contenders"]  # on the CPU: the fit as the GPU runs it, timed beside
    assert all(e[c] > 0 for e in arith["by_layer_type"].values() for c in arith["contenders"])
    md = out.with_suffix(".md").read_text()
    assert "Against the byte floor" in md and "kashin alone s" in md and "| all " in md


@pytest.mark.slow
def test_kernel_benchmark_smoke_and_rerender(tmp_path):
    pytest.importorskip("triton")
    out = tmp_path / "k"
    _run(["eval.bench_kernels", "--smoke", "--methods", "kashin-4,rtn-4", "--configs", "gemv5:8x4x64,gemv1:4x4x128",
          "--rtn-group", "row", "--out", str(out)], tmp_path, 1200)
    saved = json.loads(out.with_suffix(".json").read_text())
    assert {r["method"] for r in saved["rows"]} == {"kashin-4", "rtn-4"}
    assert all(r["read_only_s"] > 0 and r["bf16_read_only_s"] > 0 for r in saved["rows"])  # the read bounds
    assert saved["rtn_group"] is None
    rtn = next(r for r in saved["rows"] if r["method"] == "rtn-4")
    assert rtn["bits_per_weight"] == pytest.approx(4 + 16 / 256)  # 256-wide rows: one float16 scale each
    out.with_suffix(".md").unlink()
    _run(["eval.bench_kernels", "--render", str(out.with_suffix(".json"))], tmp_path, 120)
    md = out.with_suffix(".md").read_text()
    assert "Low-bit matmul kernels" in md and "one float16 scale a row" in md and "| 4.062" in md


def test_kernel_benchmark_reads_the_rtn_group_or_refuses_it():
    from eval.bench_kernels import parse_group

    assert parse_group("row") is None and parse_group("128") == 128
    for bad in ("4", "rows", "64.5"):
        with pytest.raises(SystemExit, match="--rtn-group"):
            parse_group(bad)


def test_gemv_sweep_smoke_checks_every_tile_against_the_default(tmp_path):
    """eval/sweep_gemv.py on the CPU (a small shape under the interpreter): every tile, split and eviction
    policy computes what the layer's default tile computes, and the bytes it reports are the codes plus
    rtn's float16 scales (no offset table on the symmetric grid)."""
    pytest.importorskip("triton")
    # one eviction policy and one PDL setting (the interpreter ignores both; each second value doubles a part of
    # the run): passed through as asked
    _run(["eval.sweep_gemv", "--methods", "rtn-4", "--evict", "evict_first", "--prep-pdl", "0", "--prep-xd", "1,0"],
         tmp_path, 600, OUT=str(tmp_path))
    rows = json.loads((tmp_path / "sweep_gemv.json").read_text())
    tiles = [r for r in rows if "kernel_us" in r]
    assert {r["evict"] for r in tiles} == {"evict_first"} and {r["split"] for r in tiles} == {1, 2}
    assert all(r["rel_diff"] < 1e-5 for r in tiles)
    wholes = [r for r in rows if "whole_call_us" in r]
    # one whole-call row per setting and tile asked for (the library's tile, then the smoke run's named one),
    # each with mode 6's preparation writing the float32 input and without (the same result: mode 6 never reads it)
    assert [(r["prep_pdl"], r["tile"][:3], r["prep_xd"]) for r in wholes] == [
        (False, tile, xd) for tile in (wholes[0]["tile"][:3], [1, 1, 8]) for xd in (True, False)]
    assert [r["tile"][3] for r in wholes][2:] == [2, 2]  # the named tile ran unrolled as named
    for with_xd, without in zip(wholes[::2], wholes[1::2]):
        assert with_xd["whole_rel_diff"] == without["whole_rel_diff"]
    assert {r["unroll"] for r in tiles} == {1, 2}
    assert all(r["whole_rel_diff"] < 1e-2 for r in wholes)  # the module's bf16 result against the float32 tile
    whole = wholes[0]
    k, n = whole["k"], whole["n"]
    assert whole["bytes_read"] == n * k // 2 + n * (k // 64) * 2  # 4-bit codes, one float16 scale per 64


def test_prefill_dct_sweep_smoke_checks_each_pass(tmp_path):
    """eval/sweep_prefill_dct.py on the CPU (one small width under the interpreter): both pre passes give the
    rfft the same input, the post pass and the library's whole transform match the torch DCT (up to the post
    pass's bf16 output)."""
    pytest.importorskip("triton")
    _run(["eval.sweep_prefill_dct"], tmp_path, 600, OUT=str(tmp_path))
    rows = json.loads((tmp_path / "sweep_prefill_dct.json").read_text())
    assert {r["pass"] for r in rows} == {"pre", "rfft", "post", "whole (library tiles)"}
    pre = [r for r in rows if r["pass"] == "pre"]
    assert {r["gather"] for r in pre} == {False, True} and all(r["equal"] for r in pre)
    assert all(r["rel_err_vs_torch"] < 1e-2 for r in rows if r["pass"] == "post")
    assert [r["rel_err_vs_torch"] for r in rows if r["pass"].startswith("whole")][0] < 1e-5


@pytest.mark.parametrize("steps", [False, True], ids=["one-step", "long-groups"])
def test_prep_probe_smoke_compares_the_two_preparations(tmp_path, steps):
    """eval/sweep_prep_dct.py on the CPU (one small width under the interpreter): a row for the rfft path, the
    two-launch path (stage two 16 and 64 outputs wide) and rtn's one-launch floor, and the two-launch path's
    transformed input equal to the rfft path's. With --max-n1 and --stage2-chunk: a 72 x 64 group, stage two in
    steps of 32 and 64 rows of A."""
    pytest.importorskip("triton")
    extra = ["--max-n1", "256", "--stage2-chunk", "32,64"] if steps else []
    _run(["eval.sweep_prep_dct", *extra], tmp_path, 600, OUT=str(tmp_path))
    rows = json.loads((tmp_path / "sweep_prep_dct.json").read_text())
    assert {r["path"] for r in rows} == {"rfft", "two-stage", "rtn prep (one launch)"}
    two = [r for r in rows if r["path"] == "two-stage"]
    assert two and all(r["xq_rel_diff_vs_rfft"] < 1e-5 for r in two)
    assert {r["stage2_k2"] for r in two} == {16, 64}  # stage two's two tile widths, both checked
    assert {r["stage2_chunk"] for r in two} == ({32, 64} if steps else {0})
    assert {r["n1"] for r in two} == ({72} if steps else {4})


@pytest.mark.slow
def test_tma_gemv_probe_smoke_matches_the_library(tmp_path):
    """eval/probe_tma_gemv.py on the CPU (interpreter, one small shape): the TMA-pipelined persistent GEMV's rows,
    each within float32 rounding of the library's GEMV (the probe itself stops on a larger difference)."""
    pytest.importorskip("triton")
    _run(["eval.probe_tma_gemv"], tmp_path, 600, OUT=str(tmp_path))
    rows = json.loads((tmp_path / "probe_tma_gemv.json").read_text())
    assert {r["method"] for r in rows} == {"rtn-4", "rtn-2"} and len(rows) == 4
    assert all(r["rel_diff"] < 1e-6 for r in rows)


@pytest.mark.slow
@pytest.mark.parametrize("group", ["64", "row"])
def test_round_gemv_probe_smoke_matches_the_tile_rounded_product(tmp_path, group):
    """eval/probe_round_gemv.py on the CPU (interpreter, one small shape): the GEMV that rounds its own input per
    tile, within float32 rounding of that input times the dequantized weight (the probe stops on a larger error),
    in groups of 64 and with one group a row."""
    pytest.importorskip("triton")
    _run(["eval.probe_round_gemv", "--group", group], tmp_path, 600, OUT=str(tmp_path))
    rows = json.loads((tmp_path / "probe_round_gemv.json").read_text())
    assert {r["method"] for r in rows} == {"rtn-4", "rtn-2"} and len(rows) == 4
    assert all(r["rel_err_vs_tile_rounded"] < 1e-4 and r["rel_diff_vs_library"] < 1e-3 for r in rows)


def test_loop_bodies_count_from_the_label_to_the_branch_back():
    """eval/sass_gemv.loop_bodies on nvdisasm-style text: a loop of three instructions (label to backward branch),
    a forward branch that is no loop, and the kernel's closing branch to itself, left out."""
    from eval.sass_gemv import loop_bodies

    text = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_0:
        /*0010*/                   IADD3 R2, R2, 0x1, RZ ;
        /*0020*/               @P0 BRA `(.L_x_1) ;
        /*0030*/               @!P1 BRA `(.L_x_0) ;
.L_x_1:
        /*0040*/                   EXIT ;
.L_x_2:
        /*0050*/                   BRA `(.L_x_2);
"""
    assert loop_bodies(text) == [3]


def test_joined_decode_sweep_smoke_checks_the_weight(tmp_path):
    """eval/sweep_joined_decode.py on the CPU (interpreter, one small case): a row per tile setting, way to the
    values (quantune.kernels.JOINED_DECODES), pipelining depth and form (the kernel path's float16 coefficients,
    the float32 planes), each decode within bf16's precision of the module's weight."""
    pytest.importorskip("triton")
    from quantune.kernels import JOINED_DECODES

    _run(["eval.sweep_joined_decode"], tmp_path, 300, OUT=str(tmp_path))
    rows = json.loads((tmp_path / "sweep_joined_decode.json").read_text())
    assert sorted((r["decode"], r["stages"], r["form"]) for r in rows) == \
        sorted((d, s, f) for d in JOINED_DECODES for s in (3, 1) for f in ("library", "planes"))
    assert all(r["group"] == 64 and r["rel_err"] < 4e-3 for r in rows)


@pytest.mark.slow
@pytest.mark.parametrize("group", ["64", "row"])
def test_a8_gemv_probe_smoke_matches_the_8_bit_rounded_product(tmp_path, group):
    """eval/probe_a8_gemv.py on the CPU (interpreter, one small shape): the dp4a GEMV on 8-bit inputs, within
    float32 rounding of its own rounded input times the dequantized weight (the probe exits non-zero on a larger
    error), and as far from the unrounded product as 8-bit inputs put it (far more than the library's 16 bits)."""
    pytest.importorskip("triton")
    _run(["eval.probe_a8_gemv", "--group", group], tmp_path, 600, OUT=str(tmp_path))
    rows = json.loads((tmp_path / "probe_a8_gemv.json").read_text())
    assert {r["method"] for r in rows} == {"rtn-4", "rtn-2"} and len(rows) == 4
    assert all(r["rel_err_vs_rounded"] < 1e-5 for r in rows)
    assert all(1e-3 < r["rel_err"] < 2e-2 and r["library_rel_err"] < 1e-4 for r in rows)


@pytest.mark.slow
def test_whole_paths_probe_smoke_every_path_computes_the_product(tmp_path):
    """eval/probe_whole_paths.py on the CPU (interpreter, one small shape, one repeat): the library's call and the
    listed tiles, float32 and bf16 out, each within its output's rounding of the layer's product (the probe stops
    on a larger error); float32 outputs agree with each other to float32 rounding."""
    pytest.importorskip("triton")
    _run(["eval.probe_whole_paths", "--shapes", "256x96", "--tiles", "2x1x16,4x1x8", "--repeat", "1"], tmp_path, 600,
         OUT=str(tmp_path))
    (row,) = json.loads((tmp_path / "probe_whole_paths.json").read_text())
    assert set(row["us"]) == {"library", "library-f32", "2x1x16-f32", "2x1x16-bf16", "4x1x8-f32", "4x1x8-bf16"}
    f32 = [v for name, v in row["rel_err"].items() if name.endswith("f32")]
    assert max(f32) < 1e-3 and max(f32) - min(f32) < 1e-5 and max(row["rel_err"].values()) < 1e-2


@pytest.mark.slow
def test_ratio_spread_smoke_times_every_round_and_checks_the_output(tmp_path):
    """eval/bench_ratio_spread.py on the CPU (interpreter, one small shape, two rounds): a bf16 and a library time per
    round, their ratios, and the library's output within bf16 rounding of the reference (it stops otherwise)."""
    pytest.importorskip("triton")
    out = tmp_path / "spread"
    _run(["eval.bench_ratio_spread", "--shapes", "256x96", "--methods", "rtn-4", "--rounds", "2", "--out", str(out)],
         tmp_path, 600)
    (row,) = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert len(row["bf16_us"]) == len(row["library_us"]) == len(row["x_bf16"]) == 2
    assert row["x_bf16_min"] <= row["x_bf16_median"] <= row["x_bf16_max"] and row["rel_err"] < 1e-2
    assert "Per-call speed-up, repeated" in out.with_suffix(".md").read_text()


@pytest.mark.slow
def test_fused_prep_probe_smoke_matches_the_library(tmp_path):
    """eval/probe_fused_prep.py on the CPU (interpreter, one small shape, two tokens): the GEMV whose first programs
    prepare the input gives the library's output exactly, and its counter ends reset (the probe stops otherwise)."""
    pytest.importorskip("triton")
    _run(["eval.probe_fused_prep", "--methods", "rtn-4", "--pieces", "128"], tmp_path, 600, OUT=str(tmp_path))
    rows = json.loads((tmp_path / "probe_fused_prep.json").read_text())
    assert [r["variant"] for r in rows] == ["plain", "fused"]
    assert all(r["max_diff_vs_library"] == 0.0 and r["counter_after"] == [0, 0] for r in rows)


def test_profile_driver_runs_cases_with_their_chunk_width_and_span(tmp_path):
    """eval/profile_gemv.py on the CPU (interpreter, a small shape): a case naming mode 6's chunk width, with and
    without tiles over two chunks, each checked against the dequantized weight by the driver itself."""
    pytest.importorskip("triton")
    done = _run(["eval.profile_gemv", "--calls", "1", "--cases",
                 "rtn-4:14336x4096:1x1x32:128s,rtn-2:14336x4096:1x1x16:256"], tmp_path, 600)
    assert done.stdout.count("rel. err against the dequantized weight") == 2


def test_ab_kernels_loads_another_version_beside_the_tree(tmp_path):
    """eval/ab_kernels.py's loader: a copy of quantune/kernels.py (another version's file) loads as a second
    module of the package, with its own state, and dispatches as the tree's does."""
    pytest.importorskip("triton")
    import shutil

    from eval.ab_kernels import load
    from quantune import kernels

    copy = tmp_path / "kernels_copy.py"
    shutil.copy(kernels.__file__, copy)
    other = load(str(copy), "quantune.kernels_test_copy")
    assert other is not kernels and other.__package__ == "quantune"
    other.GEMV_MIN_WARPS = 1  # its own module state
    assert kernels.GEMV_MIN_WARPS != 1
    assert other.gemv_tile(28672, True, 4096, 2, 64) == kernels.gemv_tile(28672, True, 4096, 2, 64)


def test_model_generation_benchmark_smoke(tmp_path):
    """The real-checkpoint generation bench on a tiny random model: quantized folders made and generated
    from through the CLI's library calls, every row's tokens compared with the eager reference."""
    out = tmp_path / "gen_model"
    _run(["eval.bench_generate_model", "--smoke", "--formats", "float,rtn-4,kashin-2", "--new-tokens", "6",
          "--workdir", str(tmp_path / "work"), "--out", str(out)], tmp_path, 300)
    data = json.loads(out.with_suffix(".json").read_text())
    assert [(r["format"], r["mode"]) for r in data["rows"]] == [("float", "eager"), ("rtn-4", "eager"),
                                                                ("kashin-2", "eager")]
    assert all(r["new_tokens"] == 6 and r["tokens_equal_eager"] == 6 for r in data["rows"])
    assert (tmp_path / "work" / "rtn-4" / "config.json").is_file()
    md = out.with_suffix(".md").read_text()
    assert "| float    | eager |" in md and "1.00x" in md
    assert "python -m eval.bench_generate_model --smoke --formats float,rtn-4,kashin-2 --new-tokens 6" in md


def test_divergence_reads_the_eager_logits_at_the_parting_token():
    import torch

    from eval.bench_generate_model import _divergence
    from quantune.generate import greedy_generate
    from tests.conftest import tiny_model

    model, prompt = tiny_model("llama"), torch.tensor([[0, 5, 17, 99]])
    tokens = greedy_generate(model, prompt, 6).tokens
    logits = model(input_ids=torch.tensor([[0, 5, 17, 99, *tokens[:3]]])).logits[0, -1]
    runner_up = int(logits.topk(2).indices[1])
    got = _divergence(model, prompt, tokens, 3, runner_up)
    assert int(logits.argmax()) == tokens[3]
    assert got["diverge_margin"] == pytest.approx(got["diverge_other_gap"], abs=1e-6) and got["diverge_margin"] > 0
    assert _divergence(model, prompt, tokens, 3, tokens[3])["diverge_other_gap"] == 0


def test_launch_profile_summary_takes_medians_per_code_setting_and_format(tmp_path):
    from eval.profile_launch import summarize

    def result(label, walls):
        rows = [{"format": "rtn-4", "setting": setting, "round": i, "wall_ms": w, "cpu_ms": w - 1}
                for i, (setting, w) in enumerate(walls)]
        return {"device": "GPU", "torch": "2.x", "triton": "3.x", "label": label, "layers": [], "decode": rows}

    off = {"launch.FAST_LAUNCH": False}
    paths = []
    for name, res in [("a", result("new", [({}, 10.0), (off, 20.0), ({}, 30.0), (off, 40.0)])),
                      ("b", result("new", [({}, 50.0), (off, 60.0)])), ("c", result("old", [({}, 7.0)]))]:
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(res))
    summarize([str(p) for p in paths], str(tmp_path / "summary"))
    rows = {(r["label"], r["setting"]): r for r in json.loads((tmp_path / "summary.json").read_text())["rows"]}
    assert rows[("new", "default")]["wall_ms"] == 30.0 and rows[("new", "default")]["rounds"] == 3
    assert rows[("new", "launch.FAST_LAUNCH=False")]["wall_ms"] == 40.0
    assert rows[("new", "launch.FAST_LAUNCH=False")]["cpu_ms"] == 39.0
    assert rows[("old", "default")]["tokens_per_s"] == pytest.approx(1e3 / 7.0)
    md = (tmp_path / "summary.md").read_text()
    assert "3 processes (codes alternating)" in md
    assert "| new | launch.FAST_LAUNCH=False | rtn-4 | 3 | 40.00 (20.0-60.0) | 39.00 | 25.0 |" in md


def test_hf_generate_benchmark_smoke_compiles_the_loaded_folder(tmp_path):
    out = tmp_path / "hf"
    _run(["eval.bench_hf_generate", "--smoke", "--formats", "rtn-4", "--new-tokens", "4", "--out", str(out)],
         tmp_path, 600)
    (row,) = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert row["compileable"] is True  # the quantizer lets transformers compile the loaded model
    assert row["graphs"] == 1 and row["graph_breaks"] == 0
    assert row["logits_rel_diff"] < 0.05  # the compiled forward computes the same, up to rounding
    assert "static = eager tokens" in out.with_suffix(".md").read_text()


def test_layer_memory_benchmark_counts_what_the_kernel_path_keeps(tmp_path):
    """eval/bench_layer_memory.py on the CPU: per format and HALF_COEFFS setting the stored bits per weight and the
    kernel path's copies beside them (none with float16 coefficients; kashin's float32 planes without)."""
    pytest.importorskip("triton")
    _run(["eval.bench_layer_memory", "--formats", "rtn-4 g64,kashin-4 g64"], tmp_path, 300, OUT=str(tmp_path))
    rows = {(r["format"], r["half_coeffs"]): r for r in json.loads((tmp_path / "bench_layer_memory.json").read_text())}
    assert rows[("rtn-4 g64", True)]["stored_bits_per_weight"] == pytest.approx(4.25)
    assert rows[("kashin-4 g64", True)]["kernel_path_copies_bits_per_weight"] == 0
    assert rows[("kashin-4 g64", False)]["kernel_path_copies_bits_per_weight"] == pytest.approx(3.0)
    assert rows[("rtn-4 g64", False)]["kernel_path_copies_bits_per_weight"] == 0


def test_transform_benchmark_smoke(tmp_path):
    """The transforms bench runs end to end on the CPU: both transforms, the library's decode preparation, the one
    before it and the prefill path, each checked against the float64 transform."""
    pytest.importorskip("triton")
    out = tmp_path / "t"
    _run(["eval.bench_transforms", "--smoke", "--out", str(out)], tmp_path, 300)
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [(r["in"], r["transform"]) for r in rows] == [(256, "dct"), (256, "hadamard"), (384, "dct"),
                                                         (384, "hadamard")]
    assert [r["block"] for r in rows if r["transform"] == "hadamard"] == [256, 128]
    assert all(r["hadamard_kernel"] for r in rows if r["transform"] == "hadamard")
    for r in rows:
        assert r["decode_err"] < 1e-6 and r["decode_before_err"] < 1e-6  # float32 xq
        assert r["prefill_err"] < 8e-3 and r["prefill_torch_err"] < 4e-3  # bf16 xq (the interpreter truncates)
    assert "kashin's input transform" in out.with_suffix(".md").read_text()
