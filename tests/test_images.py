"""`images` on a vision-language model: a tiny LLaVA with random weights, built from a
config (no download), loaded by `toolkit.load` with its processor."""
from __future__ import annotations

import base64
import io

import pytest
import torch

import toolkit as tk
from toolkit.errors import InvalidRequestError
from toolkit.models import ZOO_DIR

PATCHES = 16                   # a 32-pixel image in 8-pixel patches: 16 image tokens


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    from transformers import (AutoTokenizer, CLIPImageProcessor, CLIPVisionConfig,
                              LlamaConfig, LlavaConfig, LlavaForConditionalGeneration,
                              LlavaProcessor)

    folder = tmp_path_factory.mktemp("models") / "tiny-llava"
    tokenizer = AutoTokenizer.from_pretrained(ZOO_DIR / "tiny-code")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2, image_size=32, patch_size=8)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=256, eos_token_id=tokenizer.eos_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"))
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(folder)
    LlavaProcessor(image_processor=CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tokenizer, patch_size=8, vision_feature_select_strategy="default",
        image_token="<image>", num_additional_image_tokens=1).save_pretrained(folder)
    return tk.load(folder, dtype="float32")


def data_url(colour: tuple[int, int, int], size: tuple[int, int] = (40, 30)) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


RED, BLUE = data_url((200, 10, 10)), data_url((10, 10, 200), (64, 64))


def test_a_vision_language_model_loads_with_its_processor(vlm):
    assert vlm.info.image_token == "<image>"
    assert type(vlm.engine.runner).__name__ == "HFRunner"


def test_logprobs_equal_a_forward_pass_with_the_image(vlm):
    """Placeholders expanded in the prompt's token ids; every scored token (echoed prompt
    and generated) has the logprob of a direct forward with the image's pixels."""
    prompt = "look: <image> then"
    image_id = vlm.tokenizer.convert_tokens_to_ids("<image>")
    resp = vlm.completions.create(prompt=prompt, images=[RED], max_tokens=6, temperature=0,
                                  logprobs=True, echo=True, raw_output=True,
                                  return_token_ids=True,
                                  logit_bias={image_id: -100})   # (no placeholder output)
    raw = resp.choices[0].raw_output
    assert raw.prompt_token_ids.count(image_id) == PATCHES
    ids = raw.prompt_token_ids + resp.choices[0].token_ids
    from PIL import Image
    inputs = vlm.target.processor(text=prompt, images=[Image.new("RGB", (40, 30),
                                                                 (200, 10, 10))],
                                  return_tensors="pt")
    assert inputs["input_ids"][0].tolist() == raw.prompt_token_ids
    with torch.no_grad():
        ref = vlm.model(input_ids=torch.tensor([ids], device=vlm.device),
                        pixel_values=inputs["pixel_values"].to(vlm.device)
                        ).logits[0].float().log_softmax(-1).cpu()
    content = resp.choices[0].logprobs.content
    for pos in range(1, len(ids)):
        assert content[pos].logprob == pytest.approx(ref[pos - 1, ids[pos]].item(), abs=1e-4)


def test_the_image_matters_and_n_and_streaming_work(vlm):
    kw = dict(prompt="<image> is", max_tokens=5, temperature=0, logprobs=True, n=2)
    red = vlm.completions.create(images=[RED], **kw)
    blue = vlm.completions.create(images=[BLUE], **kw)
    lp = lambda r: [e.logprob for e in r.choices[0].logprobs.content]
    assert lp(red) != pytest.approx(lp(blue), abs=1e-3)
    assert red.choices[0].text == red.choices[1].text
    streamed = "".join(c.choices[0].text for c in vlm.completions.create(
        images=[RED], stream=True, **{**kw, "n": 1}))
    assert streamed == red.choices[0].text


def test_images_fill_the_placeholders_of_the_prompts_in_order(vlm):
    resp = vlm.completions.create(prompt=["one <image>", "two <image> and <image>"],
                                  images=[RED, BLUE, RED], max_tokens=2, raw_output=True)
    image_id = vlm.tokenizer.convert_tokens_to_ids("<image>")
    assert [c.raw_output.prompt_token_ids.count(image_id) for c in resp.choices] == \
        [PATCHES, 2 * PATCHES]


@pytest.mark.parametrize("fields", [
    dict(prompt="no placeholder", images=[RED]),
    dict(prompt="<image> <image>", images=[RED]),
    dict(prompt="<image>", images=["data:image/png;base64,bm90IGFuIGltYWdl"]),
    dict(prompt="<image>", images=["data:image/png;base64,%%%"]),
    dict(prompt=[1, 2, 3], images=[RED]),
])
def test_bad_images_are_invalid_requests(vlm, fields):
    with pytest.raises(InvalidRequestError) as info:
        vlm.completions.create(max_tokens=2, **fields)
    assert info.value.param == "images"
    assert vlm.completions.create(prompt="<image>", images=[RED], max_tokens=2,
                                  ignore_eos=True).usage.completion_tokens == 2


def test_a_text_model_refuses_images(llm):
    with pytest.raises(InvalidRequestError) as info:
        llm.completions.create(prompt="x", images=[RED], max_tokens=2)
    assert info.value.param == "images" and "text only" in str(info.value)


def test_images_over_http_give_the_in_process_result(vlm):
    from fireworks import Fireworks

    fields = dict(prompt="<image> is", images=[RED], max_tokens=5, seed=3, logprobs=True,
                  top_logprobs=2, raw_output=True)
    with tk.serve(vlm, port=0) as server:
        client = Fireworks(base_url=server.url.removesuffix("/v1"), api_key="-",
                           max_retries=0)
        got = client.completions.create(model=vlm.name, **fields)
    want = vlm.completions.create(**fields)
    drop = {"id", "created"}
    assert {k: v for k, v in got.model_dump(exclude_none=True).items() if k not in drop} == \
        want.model_dump(exclude_none=True, exclude=drop)
