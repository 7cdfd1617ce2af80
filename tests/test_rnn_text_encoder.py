"""The bi-LSTM text encoder (AttnGAN's): each position holds [forward state; backward state] of nn.LSTM run on that
row alone (so padding is never read), the pooled vector is the last state of each direction, and it trains with
the U-Net through `text_encoder=lstm`."""
import pytest
import torch

from models.rnn_text_encoder import LSTMTextEncoder
from models.text2image import ModelConfig, build_model
from models.text_encoder import TextEncoderConfig
from models.unet import UNetConfig
from tests.test_train_diffusion import TINY, cli_error
from train import diffusion


def make_encoder(layers=2, width=16, seed=0):
    torch.manual_seed(seed)
    return LSTMTextEncoder(TextEncoderConfig(vocab_size=50, max_length=12, width=width, layers=layers)).eval()


def batch(lengths=(12, 7, 3), L=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 50, (len(lengths), L), generator=g)
    mask = torch.arange(L)[None, :] < torch.tensor(lengths)[:, None]  # (B, L): a prefix of Trues
    return ids, mask


@pytest.mark.parametrize("layers", [1, 2])
def test_each_row_equals_the_lstm_run_on_that_row_alone(layers):
    """Batched with padding = one row at a time without it: the padding is packed away, so the backward direction
    starts at the row's <end>; the pooled vector is [forward state at <end>; backward state at <start>]."""
    enc = make_encoder(layers)
    ids, mask = batch()
    tokens, pooled = enc(ids, mask)
    H = enc.cfg.width // 2
    for b, n in enumerate(mask.sum(1).tolist()):
        out, _ = enc.lstm(enc.token_embedding(ids[b:b + 1, :n]))  # (1, n, D), no padding at all
        torch.testing.assert_close(tokens[b, :n], out[0], atol=1e-6, rtol=1e-5)
        assert (tokens[b, n:] == 0).all()
        torch.testing.assert_close(pooled[b], torch.cat([out[0, n - 1, :H], out[0, 0, H:]]), atol=1e-6, rtol=1e-5)


def test_padding_ids_change_nothing_and_the_words_do():
    enc = make_encoder()
    ids, mask = batch()
    tokens, pooled = enc(ids, mask)
    other = torch.where(mask, ids, (ids + 7) % 50)
    t2, p2 = enc(other, mask)
    assert torch.equal(tokens, t2) and torch.equal(pooled, p2)
    changed = ids.clone()
    changed[:, 1] = (changed[:, 1] + 1) % 50  # a word every row reads: both directions see it
    t3, p3 = enc(changed, mask)
    assert not torch.allclose(t3[:, 0], tokens[:, 0]) and not torch.allclose(p3, pooled)


def test_bad_config_and_input():
    with pytest.raises(ValueError, match="even text.width"):
        make_encoder(width=15)
    enc = make_encoder()
    ids, mask = batch()
    with pytest.raises(ValueError, match="prefix"):
        enc(ids, mask.flip(1))


def test_build_model_picks_the_lstm_and_it_is_trained_with_the_unet(tmp_path, capsys):
    text = TextEncoderConfig(width=32, layers=1, max_length=16)
    model = build_model(ModelConfig(text=text, unet=UNetConfig(context_dim=32, pooled_dim=32), text_encoder="lstm"),
                        vocab_size=60)
    assert isinstance(model.text_encoder, LSTMTextEncoder)
    out = tmp_path / "lstm"
    diffusion.main(TINY + ["text_encoder=lstm", "unet.pooled_dim=32", "train.steps=3", f"train.out_dir={out}"])
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["config"]["text_encoder"] == "lstm" and any(k.startswith("text_encoder.lstm.") for k in ckpt["model"])
    capsys.readouterr()
    err = cli_error(diffusion.main, TINY + ["text_encoder=lstmm", f"train.out_dir={tmp_path / 'x'}"], capsys)
    assert "joint, lstm, clip:<ckpt> or lm:<ckpt>" in err
