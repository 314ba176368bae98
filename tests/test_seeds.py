"""The seed stage on a planted fixture tree: every kind of bad or duplicate input lands in its count."""
import json
import os
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from scoder_ray.config import load_config
from scoder_ray.evaluate.benchmarks import load_humaneval
from scoder_ray.loop import run_stage
from scoder_ray.seeds import cut_text, seeds_uri
from scoder_ray.store import RunStore

GOOD = '''
def tokenize_words(text, sep=" "):
    """Split text into lowercase words, dropping empty pieces."""
    words = []
    for piece in text.split(sep):
        piece = piece.strip().lower()
        if piece:
            words.append(piece)
    return words


class Counter2:
    def __init__(self):
        self.counts = {}

    def add(self, key, n=1):
        self.counts[key] = self.counts.get(key, 0) + n
        return self.counts[key]


def short(x):
    return x
'''

OTHER = '''
def merge_intervals(intervals):
    ordered = sorted(intervals, key=lambda iv: iv[0])
    merged = [list(ordered[0])] if ordered else []
    for start, end in ordered[1:]:
        if start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [tuple(iv) for iv in merged]
'''

FLATTEN = '''
def flatten_tree(node, depth=0, out=None):
    """Collect (depth, value) pairs of a nested dict tree in pre-order."""
    if out is None:
        out = []
    out.append((depth, node.get("value")))
    for child in node.get("children", []):
        flatten_tree(child, depth + 1, out)
    return out
'''
# A near duplicate: one identifier renamed in one place, a comment added.
FLATTEN_NEAR = FLATTEN.replace('    return out', '    return out  # done')


@pytest.fixture
def fixture_tree(tmp_path):
    src = tmp_path / "src"
    (src / "pkg").mkdir(parents=True)
    (src / "good.py").write_text(GOOD)
    (src / "other.py").write_text(OTHER)
    (src / "pkg" / "copy_of_other.py").write_text("# a vendored copy\n" + OTHER)  # exact duplicate
    (src / "flatten.py").write_text(FLATTEN)
    (src / "pkg" / "flatten2.py").write_text(FLATTEN_NEAR)  # near duplicate
    he = load_humaneval()[0]
    (src / "leak.py").write_text("import math\n\n" + he["prompt"] + he["canonical_solution"])  # contamination
    (src / "blob.py").write_bytes(b"def f():\n    return 1\n\x00\x01\x02" * 10)  # binary
    (src / "latin.py").write_bytes("def caf\u00e9():\n    return 'caf\u00e9'\n".encode("latin-1"))  # not UTF-8
    (src / "empty.py").write_text("")
    (src / "gen.py").write_text("# This file is auto-generated. DO NOT EDIT.\n" + OTHER.replace("merge", "m2"))
    (src / "broken.py").write_text("def f(:\n    pass\n")
    (src / "moved.py").symlink_to(src / "no-such-file.py")  # a broken link
    table = ", ".join(f"'k{i}': {i}" for i in range(2000))
    (src / "data.py").write_text(f"def lookup(key):\n    table = {{{table}}}\n    if key in table:\n"
                                 "        return table[key]\n    return None\n")  # 5 lines, 27,872 characters
    os.mkfifo(src / "pipe.py")  # a read would wait forever
    (src / "__pycache__").mkdir()
    (src / "__pycache__" / "good.py").write_text(GOOD)  # skipped folder: must not count as a duplicate
    records = tmp_path / "records.jsonl"
    records.write_bytes((json.dumps({"code": FLATTEN.replace("    return out", "    return out  # collected")}) + "\n"
                         + json.dumps({"code": GOOD}) + "\n").encode()  # a renamed twin (near dup) and exact dups
                        + '{"code": "caf\u00e9"}\n'.encode("latin-1") + b'[1, 2]\n{oops\n')  # unreadable rows
    return src, records


@pytest.mark.slow
def test_seed_stage_counts_every_reason(ray_local, tmp_path, fixture_tree):
    src, records = fixture_tree
    cfg = load_config("tiny", [f"run.root={tmp_path}/runs", "run.id=t", f"seeds.sources=[{src},{records}]",
                               "seeds.max_snippets=0", "seeds.min_lines=5"])
    done = run_stage(cfg, "seeds")
    dropped = done["dropped"]
    assert dropped["exact_duplicate"] == 1 + 2  # the vendored copy; the record copies of tokenize_words/add
    assert dropped["near_duplicate"] == 2  # flatten2.py and the reworded record
    assert dropped["contaminated"] == 1
    assert (dropped["binary"], dropped["not_utf8"], dropped["empty"]) == (1, 1 + 1, 1)
    assert dropped["unreadable"] == 2  # the broken link and the FIFO, named in rejected/
    assert (dropped["not_object"], dropped["not_json"]) == (1, 1)  # a corpus's bad rows drop, the rest counts
    assert (dropped["auto_generated"], dropped["syntax_error"]) == (1, 1)
    assert dropped["too_short"] == 2  # short() in good.py and in the record
    assert dropped["too_long"] == 1  # data.py's 5 lines of 27,872 characters (seeds.max_chars)
    table = pq.read_table(seeds_uri(RunStore.for_config(cfg))).to_pylist()
    kept = sorted((r["path"], r["snippet"].splitlines()[0].split("(")[0].rstrip(":")) for r in table)
    assert kept == [("flatten.py", "def flatten_tree"), ("good.py", "class Counter2"),
                    ("good.py", "def tokenize_words"), ("other.py", "def merge_intervals")]
    assert done["rows"] == 4 and len({r["seed_id"] for r in table}) == 4
    assert all(r["lang"] == "python" and r["n_lines"] >= 5 for r in table)
    rejected = pq.read_table(f"{RunStore.for_config(cfg).uri('seeds')}/rejected").to_pylist()
    leak = [r for r in rejected if r["reason"] == "contaminated"][0]
    assert leak["path"] == "leak.py" and leak["detail"].startswith("humaneval:HumanEval/0/")
    bad = sorted((r["reason"], r["detail"]) for r in rejected if r["path"].startswith("records.jsonl#line"))
    assert [b[0] for b in bad] == ["not_json", "not_object", "not_utf8"] and bad[2][1].startswith("line 3: not UTF-8")
    assert sorted((r["path"], r["detail"]) for r in rejected if r["reason"] == "unreadable") == [
        ("moved.py", "No such file or directory (a broken symbolic link)"),
        ("pipe.py", "not a regular file (a FIFO, socket or device)")]
    assert [(r["path"], r["detail"]) for r in rejected if r["reason"] == "too_long"] == [
        ("data.py", "27872 characters (seeds.max_chars=8000)")]
    dup = [r for r in rejected if r["reason"] == "exact_duplicate" and r["path"].endswith("copy_of_other.py")]
    assert len(dup) == 1
    assert sum(dropped.values()) + done["rows"] == len(rejected) + len(table)

    # Same inputs: skipped. Changed config: redone with the new rule.
    assert run_stage(cfg, "seeds")["skipped"]
    cfg2 = load_config("tiny", [f"run.root={tmp_path}/runs", "run.id=t", f"seeds.sources=[{src},{records}]",
                                "seeds.max_snippets=0", "seeds.min_lines=8"])
    redo = run_stage(cfg2, "seeds")
    assert "skipped" not in redo and redo["rows"] < 4  # Counter2 (7 lines) is now too short


@pytest.mark.slow
def test_seed_stage_on_stdlib_is_deterministic(ray_local, tmp_path):
    rows = []
    for run_id in ("a", "b"):
        cfg = load_config("tiny", [f"run.root={tmp_path}", f"run.id={run_id}", "seeds.max_snippets=50"])
        assert run_stage(cfg, "seeds")["rows"] == 50
        rows.append(pq.read_table(seeds_uri(RunStore.for_config(cfg))).to_pylist())
    assert rows[0] == rows[1]


def test_max_lines_opens_big_classes_into_methods():
    conf = load_config("tiny", ["seeds.min_lines=2", "seeds.max_lines=4"]).seeds
    rows = cut_text(GOOD, "s", "good.py", conf)
    kept = {r["snippet"].splitlines()[0] for r in rows if not r["reason"]}
    assert "def __init__(self):" in kept and "def add(self, key, n=1):" in kept
    assert any(r["reason"] == "too_long" for r in rows)  # tokenize_words has 8 lines


def test_missing_source_is_a_clear_error(tmp_path):
    from scoder_ray.seeds import source_files

    with pytest.raises(ValueError, match="seeds.sources: '/no/such/dir' does not exist"):
        source_files(["/no/such/dir"])
    os.mkfifo(tmp_path / "pipe.py")
    with pytest.raises(ValueError, match=r"seeds.sources: '.*/pipe.py': not a regular file \(a FIFO, socket or device\)"):
        source_files([str(tmp_path / "pipe.py")])


def test_decontamination_index_catches_a_pasted_solution_not_common_code():
    from scoder_ray.evaluate.benchmarks import benchmark_texts
    from scoder_ray.evaluate.decontam import NgramIndex

    index = NgramIndex(benchmark_texts("humaneval"), n=10, threshold=0.5)
    he = load_humaneval()[3]
    assert index.contaminated_by("x = 1\n" + he["prompt"] + he["canonical_solution"]).startswith("HumanEval/3/")
    assert index.contaminated_by(OTHER) is None
    assert index.contaminated_by("for i in range(len(numbers)):\n    print(i)\n") is None


# -- other languages and Hugging Face datasets -------------------------------------------------------
JAVA = '''package demo;

import java.util.ArrayList;
import java.util.List;

/** A bounded stack of strings. */
public class BoundedStack {
    private final List<String> items = new ArrayList<>();
    private final int capacity;

    public BoundedStack(int capacity) {
        this.capacity = capacity;
    }

    /** Push one item; a full stack refuses it. */
    public boolean push(String item) {
        if (items.size() >= capacity) {
            return false;  // full: "{" in a comment does not count
        }
        items.add(item);
        return true;
    }

    @Override
    public String toString()
    {
        char open = '{';
        return "BoundedStack" + open + items + "}";
    }
}
'''
GO = '''package main

import "strings"

// wordCount counts the words of s.
func wordCount(s string) map[string]int {
	counts := map[string]int{}
	for _, w := range strings.Fields(s) {
		counts[strings.ToLower(w)]++
	}
	return counts
}
'''
RUST = '''/// The longer of two strings.
fn longest<'a>(x: &'a str, y: &'a str) -> &'a str {
    if x.len() > y.len() {
        x
    } else {
        y
    }
}
'''
RUBY = '''# Greets everyone on the list.
def greet_all(names)
  names.each do |name|
    puts "Hello, #{name}"
  end

  names.size
end
'''


def test_generic_cutter_finds_functions_and_methods_in_other_languages():
    conf = load_config("tiny", ["seeds.min_lines=4", "seeds.max_lines=12"]).seeds
    java = [r for r in cut_text(JAVA, "s", "BoundedStack.java", conf, "java") if not r["reason"]]
    firsts = [r["snippet"].splitlines()[0] for r in java]
    # the class (27 lines) is opened up into its methods; the doc comment and @Override come with them
    assert firsts == ["/** Push one item; a full stack refuses it. */", "@Override"]
    assert all(r["lang"] == "java" for r in java) and java[0]["snippet"].rstrip().endswith("}")
    assert (11, 3, "too_short") in [(r["start_line"], r["n_lines"], r["reason"]) for r in  # the constructor
                                    cut_text(JAVA, "s", "B.java", conf, "java")]
    go = [r for r in cut_text(GO, "s", "wc.go", conf, "go") if not r["reason"]]
    assert [r["snippet"].splitlines()[0] for r in go] == ["// wordCount counts the words of s."] and go[0]["n_lines"] == 8
    rust = cut_text(RUST, "s", "l.rs", conf, "rust")  # lifetimes ('a) are not quotes
    assert [(r["start_line"], r["n_lines"], r["reason"]) for r in rust] == [(1, 8, "")]
    ruby = cut_text(RUBY, "s", "g.rb", conf, "ruby")  # the blank line inside the body does not split it
    assert [(r["n_lines"], r["reason"]) for r in ruby] == [(8, "")]
    assert [r["reason"] for r in cut_text("int f() {\n  return 1;\n", "s", "x.c", conf, "c")] == ["no_functions"]


def test_hf_source_options_are_checked_before_any_work():
    from scoder_ray.seeds import source_files

    with pytest.raises(ValueError, match="unknown option.*colum.*expected hf:NAME_OR_FOLDER"):
        source_files(["hf:bigcode/starcoderdata?colum=content"])
    with pytest.raises(ValueError, match="limit='many' is not a whole number"):
        source_files(["hf:x?limit=many"])


@pytest.mark.slow
def test_seed_stage_reads_a_datasets_folder_and_a_folder_of_many_languages(ray_local, tmp_path):
    import datasets

    he = load_humaneval()[0]
    records = {"content": [GOOD, JAVA, "def f(:\n", he["prompt"] + he["canonical_solution"], GO],
               "path": ["a/good.py", "x/BoundedStack.java", "b/broken.py", "c/leak.py", ""],
               "language": ["Python", "Java", "Python", "Python", "Go"]}
    folder = tmp_path / "hf_code"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(records)}).save_to_disk(str(folder))
    code = tmp_path / "code"
    code.mkdir()
    (code / "wc.go").write_text(GO.replace("return counts", "return counts // done"))
    (code / "l.rs").write_text(RUST)
    (code / "g.rb").write_text(RUBY)
    (code / "notes.txt").write_text("not code")
    cfg = load_config("tiny", [f"run.root={tmp_path}/runs", "run.id=hf", "seeds.max_snippets=0", "seeds.min_lines=3",
                               "seeds.max_lines=20", f"seeds.sources=[hf:{folder}?split=train,{code}]"])
    done = run_stage(cfg, "seeds")
    table = pq.read_table(seeds_uri(RunStore.for_config(cfg))).to_pylist()
    by_lang = sorted((r["lang"], r["snippet"].splitlines()[0]) for r in table)
    assert ("java", "@Override") in by_lang and ("rust", "/// The longer of two strings.") in by_lang
    assert ("ruby", "# Greets everyone on the list.") in by_lang and ("python", "class Counter2:") in by_lang
    assert sum(lang == "go" for lang, _ in by_lang) == 1  # the renamed twin is a near duplicate
    assert done["dropped"].get("contaminated") == 1 and done["dropped"]["syntax_error"] == 1
    assert done["dropped"]["near_duplicate"] == 1
    hf_rows = [r for r in table if r["source"].startswith("hf:")]
    assert {r["path"] for r in hf_rows} >= {"0:a/good.py", "1:x/BoundedStack.java"}
    # python only: the other languages are left out, not rejected
    cfg_py = load_config("tiny", [f"run.root={tmp_path}/runs", "run.id=py", "seeds.max_snippets=0", "seeds.min_lines=3",
                                  "seeds.max_lines=20", f"seeds.sources=[hf:{folder}?split=train,{code}]",
                                  "seeds.languages=[python]"])
    done_py = run_stage(cfg_py, "seeds")
    assert {r["lang"] for r in pq.read_table(seeds_uri(RunStore.for_config(cfg_py))).to_pylist()} == {"python"}
    assert "near_duplicate" not in done_py["dropped"]
    # a split without records (saved, or streamed from an empty Parquet file, both of which `datasets` fails
    # to read): an error naming the source
    saved, streamed = tmp_path / "hf_empty", tmp_path / "hf_empty_parquet"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"content": []})}).save_to_disk(str(saved))
    streamed.mkdir()
    pq.write_table(pa.table({"content": pa.array([], pa.string())}), streamed / "train-00000.parquet")
    for source, what in ((f"hf:{saved}", "could not read the saved dataset"),
                         (f"hf:{streamed}?streaming=true", "reading its records failed")):
        cfg_empty = load_config("tiny", [f"run.root={tmp_path}/runs", "run.id=empty", f"seeds.sources=[{source}]"])
        with pytest.raises(ValueError, match=re.escape(f"seeds.sources: {source!r}: {what}") + ".*an empty"):
            run_stage(cfg_empty, "seeds")


def test_dedup_decisions_keep_the_first_and_let_the_jaccard_decide_what_a_shared_band_proposes():
    import numpy as np
    from datasketch import MinHashLSH

    from scoder_ray.seeds import apply_decisions, decide

    conf = load_config("tiny", ["seeds.sources=[b,a]", "seeds.max_snippets=0"]).seeds
    layout = MinHashLSH(threshold=conf.near_dup_threshold, num_perm=conf.num_perm)
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2**32, conf.num_perm, dtype=np.uint32)
    near = base.copy()
    near[-8:] += 1  # 120 of 128 values equal: Jaccard 0.94, and most bands shared
    one_band = rng.integers(0, 2**32, conf.num_perm, dtype=np.uint32)
    one_band[:layout.r] = base[:layout.r]  # shares exactly one band with base, Jaccard 0.125: proposed, not a duplicate
    rows = [  # (seed_id, source, path, line, exact hash, signature, contaminated by)
        ("s-late", "a", "x.py", 1, "h1", base, ""),  # source "a" is listed second: it loses to "b"
        ("s-first", "b", "z.py", 9, "h2", base, ""),
        ("s-near", "b", "z.py", 20, "h3", near, ""),
        ("s-band", "b", "z.py", 30, "h4", one_band, ""),
        ("s-copy", "b", "z.py", 40, "h2", base, ""),
        ("s-leak", "a", "y.py", 1, "h5", rng.integers(0, 2**32, conf.num_perm, dtype=np.uint32), "humaneval:HumanEval/0"),
    ]
    cols = ["seed_id", "source", "path", "start_line", "exact_hash", "minhash", "contaminated_by"]
    cand = {c: np.array([r[i] for r in rows], dtype=object) for i, c in enumerate(cols) if c != "minhash"}
    cand["minhash"] = np.stack([r[5] for r in rows])
    d = decide(cand, conf, run_seed=0)
    got = {s.decode(): (r.decode(), x.decode()) for s, r, x in zip(d["seed_id"], d["reason"], d["detail"])}
    assert got == {"s-late": ("near_duplicate", "s-first"), "s-near": ("near_duplicate", "s-first"),
                   "s-copy": ("exact_duplicate", "s-first"), "s-leak": ("contaminated", "humaneval:HumanEval/0")}
    assert list(d["seed_id"]) == sorted(d["seed_id"])  # sorted: looked up by binary search
    # applied to a batch of cut rows: decided rows get their reason, the others keep theirs
    batch = {k: np.array(v, dtype=object) for k, v in {
        "seed_id": ["s-band", "s-copy", "s-short", "s-first"], "snippet": ["x"] * 4, "source": ["b"] * 4,
        "path": ["z.py"] * 4, "start_line": [30, 40, 2, 9], "n_lines": [5] * 4, "lang": ["python"] * 4,
        "reason": ["", "", "too_short", ""], "detail": [""] * 4}.items()}
    out = apply_decisions(batch, d)
    assert list(out["reason"]) == ["", "exact_duplicate", "too_short", ""] and out["detail"][1] == "s-first"
    # beyond max_snippets: a seeded draw of the kept rows is sampled out
    capped = decide(cand, load_config("tiny", ["seeds.sources=[b,a]", "seeds.max_snippets=1"]).seeds, run_seed=0)
    assert sorted(r.decode() for r in capped["reason"]).count("sampled_out") == 1
