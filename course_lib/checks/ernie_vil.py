"""Check functions for notebook 16 (ERNIE-ViL).

Each ``check_*`` calls the learner's function on fixed inputs, compares it with the library and
prints ``PASS ...``, or raises :class:`~course_lib.checks.verdict.ExerciseError` saying what to fix.

- ``check_node_tokens(fn)``: whole-node masking, the tokens ``(B, L)`` of the chosen scene-graph nodes
  ``(B, N)`` (what ``objectives.scene_graph.mask_scene_graph_nodes`` masks);
- ``check_accuracy_by_type(fn)``: VQA accuracy per question type, vs
  ``evaluate.fine_grained.accuracy_by_type``.
"""

from __future__ import annotations

import torch

from course_lib.checks.verdict import call_learner, check_callable, expect, expect_close, passed
from course_lib.data.language import QUESTION_TYPES


def check_node_tokens(fn) -> None:
    """Grade ``fn(word_nodes (B, L) long, chosen (B, N) bool)`` -> ``(B, L)`` bool: True at every token
    whose node (``word_nodes``, -1 for a token of no node) is chosen in its own row."""
    check = "node_tokens"
    check_callable("fn", fn, check)
    nodes = torch.tensor([[-1, 2, 0, -1, 3, 3, 1, -1], [-1, 0, 1, 1, -1, -1, -1, -1]])  # "left of" = node 3
    chosen = torch.tensor([[False, False, True, True], [True, False, False, True]])
    want = torch.tensor([[False, True, False, False, True, True, False, False],
                         [False, True, False, False, False, False, False, False]])
    ours = call_learner(check, fn, nodes.clone(), chosen.clone())
    expect(isinstance(ours, torch.Tensor), check, f"return a (B, L) bool tensor, got {type(ours).__name__}")
    expect(tuple(ours.shape) == tuple(want.shape), check, f"the mask should have shape {tuple(want.shape)} (B, L), "
                                                          f"got {tuple(ours.shape)}")
    ours = ours.bool()
    if bool(ours[0, 0]) or bool(ours[1, 4:].any()):
        expect(False, check, "a token of no node (word_nodes = -1) is masked: -1 indexes the last node in Python; "
                             "keep only tokens with word_nodes >= 0")
    if bool(ours[0, 2]):
        expect(False, check, "row 0's node 0 is masked, but only row 1 chose its node 0: look each token's node up in "
                             "its own row of chosen (torch.gather along dim 1)")
    if not bool(ours[0, 5]) and bool(ours[0, 4]):
        expect(False, check, "only one token of node 3 ('left of') is masked: every token of a chosen node is")
    expect_close(ours.long(), want.long(), check, "the token mask", atol=0, rtol=0)
    passed(check, "every token of each chosen node, in its own row, and nothing else")


def check_accuracy_by_type(fn) -> None:
    """Grade ``fn(logits (N, A), answers (N,), question_types (N,))`` -> ``dict`` ``{type name: accuracy}``
    for every type of ``QUESTION_TYPES`` that occurs, plus ``"all"``: the share of argmax answers that are right."""
    from course_lib.evaluate.fine_grained import accuracy_by_type

    check = "accuracy_by_type"
    check_callable("fn", fn, check)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(40, 6, generator=g)
    answers = torch.randint(6, (40,), generator=g)
    answers[:15] = logits[:15].argmax(1)  # some right answers
    types = torch.tensor([0, 1, 2, 4] * 10)  # no "shape" question
    want = accuracy_by_type(logits, answers, types)
    ours = call_learner(check, fn, logits.clone(), answers.clone(), types.clone())
    expect(isinstance(ours, dict), check, f"return a dict {{type: accuracy}}, got {type(ours).__name__}")
    if "shape" in ours:
        expect(False, check, "'shape' is in the result but no question has that type: report only the types that occur "
                             "(a mean over no question is NaN)")
    expect(set(ours) == set(want), check, f"the keys should be {sorted(want)} (type names from QUESTION_TYPES = "
                                          f"{list(QUESTION_TYPES)}, and 'all'), got {sorted(ours)}")
    for key, value in want.items():
        got = float(ours[key])
        expect(abs(got - value) < 1e-6, check, f"accuracy of {key!r} should be {value:.4f}, got {got:.4f}: the share of "
                                               "that type's questions whose argmax answer is the right one")
    passed(check, "accuracy per question type, and over all questions")
