"""The text-following probe counts right: with stand-ins whose pictures carry their attributes as pixel values, a
model that draws what the prompt says follows it at every noise level, and one that returns its input keeps the
picture's own attribute where there is little noise."""
from types import SimpleNamespace

import pytest
import torch

import metrics.text_following as probe
from data.claims import parse_caption
from data.shapes import COLOURS, SHAPES
from models.conditioning import Conditioning
from models.schedule import NoiseSchedule, ScheduleConfig

COLOUR_NAMES = list(COLOURS)


def picture(obj):
    """A 3x4x4 picture that says its object's shape and colour in its first two channels."""
    x = torch.zeros(3, 4, 4)
    x[0] = SHAPES.index(obj["shape"]) / 10
    x[1] = COLOUR_NAMES.index(obj["colour"]) / 10
    return x


def read(pictures):
    """The stand-in classifier: attributes back from the channel means."""
    out = []
    for x in pictures:
        s, c = (int(torch.round(x[i].mean() * 10)) for i in (0, 1))
        ok = 0 <= s < len(SHAPES) and 0 <= c < len(COLOUR_NAMES)
        out.append({"objects": [{"shape": SHAPES[s], "colour": COLOUR_NAMES[c]}] if ok else []})
    return out


class StandIn:
    """Tokenizer and model in one: the ids are row numbers into the last prompts; `follow` draws the prompt."""

    def __init__(self, follow):
        self.follow, self.prompts = follow, []
        self.text_encoder = SimpleNamespace(cfg=SimpleNamespace(max_length=16))

    def __call__(self, prompts, max_length):
        self.prompts = list(prompts)
        ids = torch.arange(len(prompts))[:, None]
        return ids, torch.ones_like(ids, dtype=torch.bool)

    def parameters(self):
        yield torch.zeros(1)

    def encode_text(self, ids, mask):
        return Conditioning(tokens=ids.float()[:, :, None], mask=mask)

    def denoise(self, x_t, t, cond):  # prediction_type "sample": the output is x0_hat
        if not self.follow:
            return x_t
        rows = cond.tokens[:, 0, 0].long().tolist()
        return torch.stack([picture(parse_caption(self.prompts[r])["objects"][0]) for r in rows])


@pytest.mark.parametrize("attribute", ["shape", "colour"])
def test_follow_and_keep_are_counted(monkeypatch, attribute):
    monkeypatch.setattr(probe, "predict_attributes", lambda classifier, pictures: read(pictures))
    objects = [{"shape": s, "colour": c} for s, c in zip(SHAPES, COLOUR_NAMES)]  # 7 renders, all values distinct
    images = torch.stack([picture(o) for o in objects])
    attributes = [{"objects": [o]} for o in objects]
    schedule = NoiseSchedule(ScheduleConfig(prediction_type="sample"))
    values = len(probe.VALUES[attribute])
    for follow, expected in ((True, {"follows": 1.0, "keeps": 0.0}), (False, {"follows": 0.0, "keeps": 1.0})):
        stand_in = StandIn(follow)
        pipe = SimpleNamespace(model=stand_in, tokenizer=stand_in, schedule=schedule, vae=None, scale_factor=1.0)
        rates = probe.follow_rates(pipe, None, images, attributes, attribute, [0, 999] if follow else [0], 3.0, 0)
        for t, r in rates.items():
            assert r["pairs"] == len(objects) * (values - 1)  # every render against every other value
            assert r["follows"] == expected["follows"] and r["keeps"] == expected["keeps"], (follow, t, r)


def test_denoising_error_of_a_perfect_and_of_a_do_nothing_denoiser():
    """Under their own prompts a model that draws the prompt's picture returns x_0 (error 0 at every t); one that
    returns its input scores the MSE of x_t against x_0, and the do-nothing figure is x_t / sqrt(abar_t)'s."""
    objects = [{"shape": s, "colour": c} for s, c in zip(SHAPES, COLOUR_NAMES)]
    images = torch.stack([picture(o) for o in objects])
    attributes = [{"objects": [o]} for o in objects]
    schedule = NoiseSchedule(ScheduleConfig(prediction_type="sample"))
    for follow in (True, False):
        stand_in = StandIn(follow)
        pipe = SimpleNamespace(model=stand_in, tokenizer=stand_in, schedule=schedule, vae=None, scale_factor=1.0)
        figures, pictures = probe.denoising(pipe, images, attributes, [10, 500], 3.0, seed=2)
        for t in (10, 500):
            abar = schedule.alphas_cumprod[t]
            noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(2 * 1000 + t))
            x_t = abar.sqrt() * images + (1 - abar).sqrt() * noise
            assert torch.allclose(pictures[t][0], x_t.clamp(-1, 1), atol=1e-6)
            expected = 0.0 if follow else ((x_t.clamp(-1, 1) - images) ** 2).mean().item()
            assert figures[t]["mse"] == pytest.approx(expected, abs=1e-7)
            assert figures[t]["mse_input"] == pytest.approx(((x_t / abar.sqrt() - images) ** 2).mean().item(), rel=1e-5)
        assert figures[10]["mse_input"] < figures[500]["mse_input"]
