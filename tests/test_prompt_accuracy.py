"""Prompt-accuracy judging (GenEval-style claims) on attribute dicts, and end to end on rendered scenes
judged against their own captions' claims."""
from data.claims import judge, pair_objects, parse_caption
from data.shapes import sample_scene
from metrics.prompt_accuracy import summarise


def obj(colour, shape, size="small", x=0.5, y=0.5):
    return {"colour": colour, "shape": shape, "size": size, "x": x, "y": y}


def detected(*objects):
    return {"objects": list(objects), "count": len(objects), "background": "black"}


def test_single_object_claims():
    expected = parse_caption("a red circle")
    assert judge(expected, detected(obj("red", "circle"))) == {"count": True, "colour": True, "shape": True,
                                                              "overall": True}
    wrong_colour = judge(expected, detected(obj("blue", "circle")))
    assert wrong_colour["shape"] and not wrong_colour["colour"] and not wrong_colour["overall"]
    extra = judge(expected, detected(obj("red", "circle"), obj("red", "circle", x=0.9)))
    assert extra["colour"] and not extra["count"] and not extra["overall"]
    nothing = judge(expected, detected())
    assert not any(nothing.values())


def test_size_is_judged_only_when_stated():
    assert "size" not in judge(parse_caption("a red circle"), detected(obj("red", "circle", "large")))
    stated = judge(parse_caption("a small red circle"), detected(obj("red", "circle", "large")))
    assert stated["colour"] and not stated["size"] and not stated["overall"]


def test_relation_uses_detected_centres():
    expected = parse_caption("a red circle to the left of a blue square")
    left = detected(obj("red", "circle", x=0.2), obj("blue", "square", x=0.8))
    right = detected(obj("blue", "square", x=0.2), obj("red", "circle", x=0.8))
    assert judge(expected, left)["relation"] and judge(expected, left)["overall"]
    assert not judge(expected, right)["relation"] and not judge(expected, right)["overall"]


def test_pairing_prefers_exact_matches():
    expected = parse_caption("a red circle and a blue circle")["objects"]
    pairs = pair_objects(expected, [obj("blue", "circle"), obj("red", "circle")])
    assert [p["colour"] for p in pairs] == ["red", "blue"]


def test_true_scenes_satisfy_their_captions():
    judgements = []
    for index in range(200):
        caption, attrs = sample_scene(seed=3, index=index, max_objects=3)
        truth = {"objects": attrs["objects"], "count": attrs["count"], "background": attrs["background"]}
        judgements.append(judge(parse_caption(caption), truth))
    summary = summarise(judgements)
    assert summary["overall"] == 1.0 and summary["images"] == 200
    assert "relation" in summary and "size" in summary  # the sample exercised every claim
