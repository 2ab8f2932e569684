"""Prompts of a run (``kvpo.training.prompts``): the hold-out rule, the deterministic draw of a
group's training sequence, prompt files (.txt, .jsonl) and their errors, and the toy source's
fixed held-out stories."""

import pytest

from kvpo.training.config import ConfigError
from kvpo.training.config_parse import load_config
from kvpo.training.distributed import rank_seed
from kvpo.training.prompts import PromptFileError, PromptSource, load_prompt_file, prompt_source
from kvpo.training.validation import validate

SEQS = [["a"], ["b", "b2"], ["c"], ["d"], ["e", "e2"]]
DRAWS = [(step, rank) for step in range(40) for rank in range(3)]


def _drawn(source):
    return [source.train(step, rank) for step, rank in DRAWS]


def test_last_eval_prompts_are_held_out_and_never_drawn():
    source = PromptSource.from_sequences(SEQS, eval_prompts=2, seed=11)
    assert source.heldout(0) == [["d"], ["e", "e2"]]
    assert source.heldout(1) == [["d"]]
    assert source.heldout(5) == [["d"], ["e", "e2"]]
    drawn = _drawn(source)
    # the draw: sequences[rank_seed(seed, rank, step) % N] over the 3 training sequences
    assert drawn == [SEQS[rank_seed(11, rank, step) % 3] for step, rank in DRAWS]
    assert {tuple(s) for s in drawn} == {("a",), ("b", "b2"), ("c",)}  # all of them, no others


@pytest.mark.parametrize(("sequences", "eval_prompts"), [(SEQS, 0), (SEQS[:3], 5), (SEQS[:3], 3)])
def test_nothing_held_out(sequences, eval_prompts):
    """eval_prompts 0, or no more sequences than eval_prompts: every sequence trains, and the
    held-out prompts are the training ones."""
    n = len(sequences)
    source = PromptSource.from_sequences(sequences, eval_prompts=eval_prompts, seed=4)
    assert source.heldout(0) == sequences
    assert source.heldout(2) == sequences[:2]
    assert _drawn(source) == [sequences[rank_seed(4, rank, step) % n] for step, rank in DRAWS]
    assert len({tuple(s) for s in _drawn(source)}) == n


def test_separate_heldout_list():
    held = [["x"], ["y", "y2"], ["z"]]
    source = PromptSource.from_sequences(SEQS, held, eval_prompts=2, seed=0)
    assert source.heldout(2) == [["x"], ["y", "y2"]]  # the first count
    assert source.heldout(0) == held
    # every training sequence is drawn (eval_prompts does not remove any)
    assert _drawn(source) == [SEQS[rank_seed(0, rank, step) % 5] for step, rank in DRAWS]
    assert len({tuple(s) for s in _drawn(source)}) == 5


def test_draws_depend_on_seed_step_and_rank():
    a = PromptSource.from_sequences(SEQS, eval_prompts=0, seed=0)
    b = PromptSource.from_sequences(SEQS, eval_prompts=0, seed=1)
    assert _drawn(a) == _drawn(PromptSource.from_sequences(SEQS, eval_prompts=0, seed=0))
    assert _drawn(a) != _drawn(b)
    assert [a.train(s, 0) for s in range(20)] != [a.train(s, 1) for s in range(20)]


def test_no_sequences():
    with pytest.raises(ValueError, match="need at least one training prompt sequence"):
        PromptSource.from_sequences([])


# ------------------------------------------------------------------------------ prompt files
TXT = """# a comment line
a red circle moves left | a blue circle moves up

   a green square moves down|a green square moves left
# another comment
a cyan triangle moves right
"""
TXT_SEQS = [
    ["a red circle moves left", "a blue circle moves up"],
    ["a green square moves down", "a green square moves left"],
    ["a cyan triangle moves right"],
]
JSONL = """{"prompts": ["a red circle moves left", " a red circle moves up "]}

{"prompts": ["a yellow square moves down"]}
"""
JSONL_SEQS = [["a red circle moves left", "a red circle moves up"], ["a yellow square moves down"]]


def test_prompt_source_from_a_txt_file(tmp_path):
    (tmp_path / "p.txt").write_text(TXT)
    source = prompt_source(str(tmp_path / "p.txt"), None, num_segments=2, eval_prompts=1, seed=3)
    assert source.heldout(0) == [["a cyan triangle moves right"]]
    assert _drawn(source) == [TXT_SEQS[rank_seed(3, rank, step) % 2] for step, rank in DRAWS]


def test_prompt_source_with_a_jsonl_heldout_file(tmp_path):
    (tmp_path / "train.txt").write_text(TXT)
    (tmp_path / "held.jsonl").write_text(JSONL)
    source = prompt_source(
        str(tmp_path / "train.txt"), str(tmp_path / "held.jsonl"), num_segments=2,
        eval_prompts=1, seed=3,
    )  # fmt: skip
    assert load_prompt_file(tmp_path / "held.jsonl") == JSONL_SEQS
    assert source.heldout(1) == JSONL_SEQS[:1] and source.heldout(0) == JSONL_SEQS
    assert _drawn(source) == [TXT_SEQS[rank_seed(3, rank, step) % 3] for step, rank in DRAWS]


def test_too_many_segments_names_file_and_line(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("# c\na | b\n\na | b | c\n")
    with pytest.raises(PromptFileError) as err:
        prompt_source(str(path), None, num_segments=2, eval_prompts=0, seed=0)
    assert str(err.value) == (
        f"{path}:4: 3 segments, but the video has only 2 (one more than switch_frame_indices)"
    )
    held = tmp_path / "held.jsonl"
    held.write_text('{"prompts": ["a", "b", "c"]}\n')
    (tmp_path / "ok.txt").write_text("a | b\n")
    with pytest.raises(PromptFileError, match=f"^{held}:1: 3 segments"):
        prompt_source(str(tmp_path / "ok.txt"), str(held), num_segments=2, eval_prompts=0, seed=0)
    assert load_prompt_file(path, max_segments=3)[1] == ["a", "b", "c"]


def _problems(overrides):
    with pytest.raises(ConfigError) as err:
        validate(load_config(None, overrides))
    return str(err.value)


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("p.csv", "a,b\n", "expected one of ('.txt', '.jsonl')"),
        ("p.jsonl", '{"prompts": ["a"]}\nnot json\n', "p.jsonl:2: not a JSON object"),
        ("p.jsonl", '{"prompt": ["a"]}\n', 'expected an object with a "prompts" list'),
        ("p.jsonl", '{"prompts": "a"}\n', '"prompts" must be a list of strings'),
        ("p.txt", "a | | b\n", "p.txt:1: empty prompt segment"),
        ("p.txt", "a | b | c | d\n", "4 segments, but the video has only 3"),
        ("p.txt", "# only a comment\n", "holds no prompts"),
    ],
)
def test_prompt_file_format_errors(tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    assert message in _problems([f"data_path={tmp_path / name}"])


def test_prompt_files_read(tmp_path):
    (tmp_path / "p.txt").write_text("# comment\na red circle moves left | a blue circle moves up\n")
    (tmp_path / "p.jsonl").write_text('{"prompts": ["a red circle moves left"]}\n')
    assert load_prompt_file(tmp_path / "p.txt") == [
        ["a red circle moves left", "a blue circle moves up"]
    ]
    assert load_prompt_file(tmp_path / "p.jsonl") == [["a red circle moves left"]]
    (tmp_path / "q.txt").write_text(TXT)
    assert load_prompt_file(tmp_path / "q.txt") == TXT_SEQS
    with pytest.raises(PromptFileError, match="does not exist"):
        load_prompt_file(tmp_path / "missing.txt")


# ------------------------------------------------------------------------------- the toy source
COLOURS = ["red", "yellow", "green", "cyan", "blue", "magenta"]
SHAPES = ["circle", "square", "triangle"]
DIRECTIONS = ["left", "right", "up", "down"]


def _held_out_triple(text):
    """The toy split rule written out: (colour + 2 shape + direction) % 6 == 0."""
    a, colour, shape, moves, direction = text.split()
    assert (a, moves) == ("a", "moves")
    return (COLOURS.index(colour) + 2 * SHAPES.index(shape) + DIRECTIONS.index(direction)) % 6 == 0


def test_toy_heldout_stories_fixed_and_disjoint_from_training():
    source = prompt_source(None, None, num_segments=3, eval_prompts=4, seed=0)
    stories = source.heldout(0)
    assert len(stories) == 16 and all(len(s) == 3 for s in stories)
    assert stories[:2] == [
        ["a magenta triangle moves down", "a magenta triangle moves up",
         "a magenta triangle moves down"],
        ["a green square moves up", "a red square moves down", "a magenta square moves up"],
    ]  # fmt: skip
    assert source.heldout(4) == stories[:4]
    # the same stories for any run seed
    assert PromptSource.toy(3, seed=99).heldout(0) == stories
    # every held-out story opens with a held-out triple; training never uses one
    assert all(_held_out_triple(s[0]) for s in stories)
    drawn = _drawn(source)
    assert all(len(s) == 3 and not any(map(_held_out_triple, s)) for s in drawn)
    assert not {s[0] for s in stories} & {seg for s in drawn for seg in s}
    assert drawn == _drawn(PromptSource.toy(3, seed=0))  # deterministic
    assert drawn != _drawn(PromptSource.toy(3, seed=1))
    assert len({tuple(s) for s in drawn}) > 100  # 120 draws, (nearly) all different


# ---------------------------------------------------------------- the authors' bracket format
BRACKETS = """3,[a fox runs through snow],[the fox stops],[snow falls]
0,
1,[waves on a beach]
[a cat [orange] sleeps],[it wakes up]
2, [a city at night] , [rain starts]
"""


def test_bracket_lines_with_segment_filters(tmp_path):
    path = tmp_path / "formatted.txt"
    path.write_text(BRACKETS + "a plain line | with pipes\n")
    assert load_prompt_file(path) == [
        ["a fox runs through snow", "the fox stops", "snow falls"],
        ["waves on a beach"],
        ["a cat [orange] sleeps", "it wakes up"],  # inner brackets stay in the field
        ["a city at night", "rain starts"],
        ["a plain line", "with pipes"],
    ]
    # the authors' filters: cut to prompt_max_segments, then drop those under the minimum
    assert load_prompt_file(path, min_segments=2, keep_segments=2) == [
        ["a fox runs through snow", "the fox stops"],
        ["a cat [orange] sleeps", "it wakes up"],
        ["a city at night", "rain starts"],
        ["a plain line", "with pipes"],
    ]
    with pytest.raises(PromptFileError, match="no prompts with at least 4 segments"):
        load_prompt_file(path, min_segments=4)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("2,[a fox runs],[it stops", r"formatted.txt:2: unclosed '\['"),
        ("2,[a fox runs]],[it stops]", r"formatted.txt:2: '\]' at column 15 closes nothing"),
        ("2,[a fox runs] and [it stops]", "formatted.txt:2: text outside"),
        ("3,", "formatted.txt:2: count 3 but no"),
        ("2,[a fox runs],[ ]", "formatted.txt:2: empty prompt segment"),
    ],
)
def test_malformed_bracket_lines_name_the_line(tmp_path, line, message):
    path = tmp_path / "formatted.txt"
    path.write_text("1,[a good line]\n" + line + "\n")
    with pytest.raises(PromptFileError, match=message):
        load_prompt_file(path)


def test_sweep_order_across_ranks():
    """The authors' order: rollout r (1-based) on rank k of W takes ((r - 1) * W + k) % N."""
    seqs = [[f"prompt {i}"] for i in range(5)]
    source = PromptSource.from_sequences(seqs, order="sweep", world_size=2)
    drawn = [[source.train(r - 1, k)[0] for k in range(2)] for r in range(1, 5)]
    assert drawn == [
        ["prompt 0", "prompt 1"],
        ["prompt 2", "prompt 3"],
        ["prompt 4", "prompt 0"],
        ["prompt 1", "prompt 2"],
    ]
    with pytest.raises(ValueError, match="prompt order must be one of"):
        PromptSource.from_sequences(seqs, order="shuffled")
