"""R-precision on constructed embeddings whose answer is known: a perfect judge scores 1, a caption ranked k-th
among all scores the hypergeometric chance that none of the k - 1 better ones is drawn, captions of the same key
are never drawn against each other, a tie is a miss; and the command reads a `python -m data.shapes --export`
folder and rejects bad input in one line."""
import json
from math import comb

import pytest
import torch

from data import shapes
from metrics import r_precision as rp
from tests.test_clip_score import tiny_clip  # noqa: F401 (a fixture: a random tiny CLIP checkpoint)
from tests.test_train_diffusion import cli_error

U = 200  # captions, each with its own one-hot text embedding


def rank_k_images(k, n):
    """n images, image i of caption i % U, whose caption ranks k-th: k - 1 other captions are twice as close."""
    text = torch.eye(U)  # (U, E = U)
    caption = torch.arange(n) % U
    images = text[caption].clone()  # (n, U)
    for j in range(1, k):
        images[torch.arange(n), (caption + j) % U] = 2.0
    return torch.nn.functional.normalize(images, dim=-1), text, caption


def test_the_true_caption_ranked_first_always_hits():
    images, text, caption = rank_k_images(1, 400)
    rate, hits = rp.r_precision(images, text, caption, keys=list(range(U)))
    assert rate == 1.0 and hits.all()


@pytest.mark.parametrize("k", [2, 4])
def test_a_caption_ranked_kth_hits_as_often_as_no_better_one_is_drawn(k):
    """P(hit) = C(M - (k - 1), 99) / C(M, 99) with M = U - 1 mismatched captions: 0.503 for k = 2, 0.126 for k = 4."""
    n = 6000
    images, text, caption = rank_k_images(k, n)
    rate, _ = rp.r_precision(images, text, caption, keys=list(range(U)), seed=3)
    M = U - 1
    p = comb(M - (k - 1), 99) / comb(M, 99)
    assert abs(rate - p) < 4 * (p * (1 - p) / n) ** 0.5, (rate, p)


def test_with_every_caption_a_candidate_the_rate_is_exact():
    first, text, caption = rank_k_images(1, 150)
    second, _, _ = rank_k_images(2, 50)
    rate, hits = rp.r_precision(torch.cat([first, second]), text, torch.cat([caption, caption[:50]]),
                                keys=list(range(U)), candidates=U)
    assert rate == 150 / 200 and hits[:150].all() and not hits[150:].any()


def test_captions_of_one_key_are_never_mismatches_and_a_tie_is_a_miss():
    images, text, caption = rank_k_images(2, 400)  # the closer caption is the next one, (i + 1) % U
    keys = [u // 2 for u in range(U)]  # pairs (0, 1), (2, 3), ... share a key
    rate, hits = rp.r_precision(images, text, caption, keys=keys, candidates=U - 1)  # every other key drawn
    assert hits[caption % 2 == 0].all() and not hits[caption % 2 == 1].any() and rate == 0.5  # 2u+1 never drawn vs 2u
    tie = torch.nn.functional.normalize(text[caption] + text[(caption + 1) % U], dim=-1)
    assert rp.r_precision(tie, text, caption, keys=list(range(U)), candidates=U)[0] == 0.0


def test_mismatch_by_objects_ignores_size_and_background_words():
    key = lambda c: rp.mismatch_key(c, "objects")
    assert key("a photo of a red circle") == key("a small red circle on a black background")
    assert key("a red circle") != key("a blue circle") != key("a blue square")
    assert key("a red circle above a blue square") != key("a red circle below a blue square")
    assert rp.mismatch_key("a photo of a red circle", "text") != rp.mismatch_key("a red circle", "text")
    with pytest.raises(ValueError, match="use --mismatch text"):
        key("a cat on a mat")


def test_command_on_an_exported_folder_and_bad_input(tiny_clip, tmp_path, capsys):  # noqa: F811
    _, _, clip_path = tiny_clip
    folder = tmp_path / "renders"
    shapes.export_folder(folder, 120, 16, seed=7)
    out = tmp_path / "r.json"
    rp.main(["--clip", str(clip_path), "--images", str(folder), "--candidates", "20", "--out", str(out)])
    figures = json.loads(out.read_text())
    assert figures["images"] == 120 and figures["candidates"] == 20 and 0 <= figures["r_precision"] <= 1
    assert "R-precision (top-1 among 20 captions" in capsys.readouterr().out
    assert "exists" in cli_error(rp.main, ["--clip", str(clip_path), "--images", str(folder), "--out", str(out)],
                                 capsys)
    assert "mismatched captions per image" in cli_error(
        rp.main, ["--clip", str(clip_path), "--images", str(folder), "--candidates", "1000"], capsys)
    assert "at least 2" in cli_error(rp.main, ["--images", str(folder), "--candidates", "1"], capsys)


def test_most_candidates_is_one_more_than_the_smallest_pool():
    captions = ["a red circle", "a photo of a red circle", "a red circle", "a blue square", "a green star"]
    assert rp.most_candidates(captions) == 3  # the red circles have 2 mismatches (blue square, green star)
    assert rp.most_candidates(captions, "text") == 4
