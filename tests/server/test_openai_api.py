"""The OpenAI-compatible HTTP API through the official `openai` client (sync and async) and raw
HTTP: completions and chat completions, streamed and not, against LLM.generate / LLM.chat; n,
prompt lists, logprobs in both shapes, stop strings, seeds; /v1/models, /tokenize,
/detokenize, /metrics; and every error with its HTTP code and OpenAI's error body."""

import asyncio
import json
import logging
import math
import os
import re
import subprocess
import sys
import time

import httpx
import openai
import pytest

from jaxserve import LLM, SamplingParams
from jaxserve.model_io.chat_template import encode_chat
from jaxserve.sim.workload import WorkloadSpec, generate_workload
from tests.jaxserve.test_llm_chat import CONVERSATION, builtin_with_chat_template
from tests.server.conftest import ENGINE_LIMITS
from tests.server.openai_server import HttpServerThread, get, post, templated_engine_factory

PROMPT = "The quick brown fox"
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return builtin_with_chat_template(str(tmp_path_factory.mktemp("templated")))


@pytest.fixture(scope="module")
def api(model_dir):
    server = HttpServerThread(templated_engine_factory(model_dir), served_model_name="tiny")
    yield server
    server.close()


@pytest.fixture(scope="module")
def client(api) -> openai.OpenAI:
    return openai.OpenAI(base_url=api.base_url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def llm(model_dir) -> LLM:
    return LLM(model_dir, precompile=False, progress=False, **ENGINE_LIMITS)


def _streamed_completion(client, **kwargs) -> tuple[dict[int, str], dict[int, str], list]:
    """(text by choice index, finish_reason by index, the chunks) of a streamed completion."""
    texts, reasons, chunks = {}, {}, []
    for chunk in client.completions.create(stream=True, **kwargs):
        chunks.append(chunk)
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
            if choice.finish_reason is not None:
                reasons[choice.index] = choice.finish_reason
    return texts, reasons, chunks


def test_completion_streamed_equals_unary_equals_llm_generate(api, client, llm):
    (expected,) = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=12,
                                                      ignore_eos=True), use_tqdm=False)
    args = dict(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0,
                extra_body={"ignore_eos": True})
    unary = client.completions.create(**args)
    assert unary.id.startswith("cmpl-") and unary.object == "text_completion"
    assert unary.model == "tiny" and abs(unary.created - time.time()) < 60
    (choice,) = unary.choices
    assert choice.text == expected.outputs[0].text
    assert choice.finish_reason == "length" and choice.logprobs is None
    assert unary.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert unary.usage.completion_tokens == 12 and unary.usage.total_tokens == 12 + len(
        expected.prompt_token_ids)
    texts, reasons, chunks = _streamed_completion(
        client, stream_options={"include_usage": True}, **args)
    assert texts == {0: expected.outputs[0].text} and reasons == {0: "length"}
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert len({c.id for c in chunks}) == 1
    # Token ids as the prompt: the same text.
    by_ids = client.completions.create(**dict(args, prompt=list(expected.prompt_token_ids)))
    assert by_ids.choices[0].text == expected.outputs[0].text
    assert api.wait_idle()


def test_chat_async_streamed_equals_unary_equals_llm_chat(api, llm):
    (expected,) = llm.chat(CONVERSATION, SamplingParams(temperature=0, max_tokens=10,
                                                        ignore_eos=True), use_tqdm=False)

    async def run():
        client = openai.AsyncOpenAI(base_url=api.base_url + "/v1", api_key="unused",
                                    max_retries=0)
        args = dict(model="tiny", messages=CONVERSATION, max_completion_tokens=10,
                    temperature=0, extra_body={"ignore_eos": True})
        unary, stream = await asyncio.gather(
            client.chat.completions.create(**args),
            client.chat.completions.create(stream=True, stream_options={"include_usage": True},
                                           **args))
        chunks = [chunk async for chunk in stream]
        await client.close()
        return unary, chunks

    unary, chunks = asyncio.run(run())
    assert unary.id.startswith("chatcmpl-") and unary.object == "chat.completion"
    (choice,) = unary.choices
    assert choice.message.role == "assistant"
    assert choice.message.content == expected.outputs[0].text
    assert choice.finish_reason == "length"
    assert unary.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert unary.usage.completion_tokens == 10
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == expected.outputs[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 10
    assert api.wait_idle()


def test_n_prompt_lists_and_completion_logprobs(api, client):
    response = client.completions.create(model="tiny", prompt=["one", "two"], n=2, max_tokens=6,
                                         temperature=1.0, seed=3, logprobs=2,
                                         extra_body={"ignore_eos": True})
    assert sorted(c.index for c in response.choices) == [0, 1, 2, 3]
    assert response.usage.completion_tokens == 4 * 6
    assert response.usage.prompt_tokens == 2 * (1 + 3)  # <bos> + 3 bytes, each prompt once
    for choice in response.choices:
        lp = choice.logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
        assert all(x <= 0 for x in lp.token_logprobs)
        for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
            assert 1 <= len(top) <= 3  # the sampled token and the top 2, by their text:
            if token != "\ufffd":  # (pieces of characters share one text; the last one wins)
                assert top[token] == logprob
        offsets = [0]
        for token in lp.tokens[:-1]:
            offsets.append(offsets[-1] + len(token))
        assert lp.text_offset == offsets
    # Streamed, logprobs come with each chunk and add up to one per token.
    chunks = list(client.completions.create(model="tiny", prompt="one", max_tokens=6,
                                            temperature=0, logprobs=1, stream=True,
                                            extra_body={"ignore_eos": True}))
    tokens = [t for c in chunks for t in (c.choices[0].logprobs.tokens if c.choices[0].logprobs
                                          else [])]
    assert len(tokens) == 6


def test_chat_logprobs(api, client):
    response = client.chat.completions.create(model="tiny", messages=CONVERSATION,
                                              max_completion_tokens=5, temperature=0,
                                              logprobs=True, top_logprobs=3,
                                              extra_body={"ignore_eos": True})
    content = response.choices[0].logprobs.content
    assert len(content) == 5
    for entry in content:
        assert entry.bytes == list(entry.token.encode("utf-8"))
        assert len(entry.top_logprobs) == 3
        top = [t.logprob for t in entry.top_logprobs]
        assert top == sorted(top, reverse=True) and entry.logprob == top[0]  # greedy: the top


def test_seed_reproduces_text_and_stop_strings_end_it(api, client):
    args = dict(model="tiny", prompt="seeded", max_tokens=16, temperature=1.0,
                extra_body={"ignore_eos": True})
    first = client.completions.create(seed=11, **args).choices[0].text
    assert client.completions.create(seed=11, **args).choices[0].text == first
    assert client.completions.create(seed=12, **args).choices[0].text != first
    greedy = dict(args, prompt="abc", temperature=0)  # its greedy text: "4,4,,qqqqqqqqqqq"
    text = client.completions.create(**greedy).choices[0].text
    # A whole character first seen past the start: the text stops just before it.
    stop = next(ch for i, ch in enumerate(text) if i >= 2 and text.index(ch) == i != "\ufffd")
    expected = text[:text.index(stop)]
    stopped = client.completions.create(stop=[stop], **greedy).choices[0]
    assert (stopped.text, stopped.finish_reason, stopped.stop_reason) == (expected, "stop", stop)
    texts, reasons, _ = _streamed_completion(client, stop=stop, **greedy)
    assert texts == {0: expected} and reasons == {0: "stop"}


def test_models_tokenize_detokenize_and_metrics(api, model_dir):
    models = get(api.base_url + "/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["tiny"]
    assert models["data"][0]["max_model_len"] == ENGINE_LIMITS["max_model_len"]
    tokenizer = api.engine.tokenizer
    tokens = post(api.base_url + "/tokenize",
                        json={"prompt": "héllo", "return_token_strs": True}).json()
    assert tokens["tokens"] == tokenizer.encode("héllo") and tokens["count"] == 7
    assert tokens["token_strs"][0] == "<bos>"
    chat = post(api.base_url + "/tokenize", json={"messages": CONVERSATION}).json()
    assert chat["tokens"] == encode_chat(tokenizer, CONVERSATION)[1]
    text = post(api.base_url + "/detokenize", json={"tokens": tokens["tokens"]}).json()
    assert text == {"prompt": "héllo"}
    metrics = get(api.base_url + "/metrics").text
    assert 'jaxserve_http_requests_total{path="/tokenize",status="200"} 2.0' in metrics
    assert "jaxserve_time_to_first_token_seconds_count" in metrics


def _error(response: httpx.Response, status: int, param=None) -> dict:
    """The OpenAI error object of a refused call, checked for its status and param."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"], body
    if param is not None:
        assert body["error"]["param"] == param, body
    return body["error"]


@pytest.mark.parametrize("path, body, param, says", [
    ("/v1/completions", {"prompt": "x", "temperature": -1}, "temperature", "[0, 100]"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, "top_p", "(0, 1]"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, "max_tokens", ">= 1"),
    ("/v1/completions", {"prompt": "x", "n": 99}, "n", "max_num_seqs"),
    ("/v1/completions", {"prompt": "x", "logprobs": 99}, "logprobs", "max_logprobs"),
    ("/v1/completions", {"prompt": "x", "temprature": 1}, "temprature", "Unrecognized"),
    ("/v1/completions", {"prompt": "x", "echo": True}, "echo", "not supported"),
    ("/v1/completions", {"prompt": "x", "stream_options": {"include_usage": True}},
     "stream_options", "stream: true"),
    ("/v1/completions", {}, "prompt", "required"),
    ("/v1/completions", {"prompt": []}, "prompt", "empty"),
    ("/v1/completions", {"prompt": [1, 2, 999]}, "prompt", "vocabulary"),
    ("/v1/completions", {"prompt": [1, True]}, "prompt", None),
    ("/v1/completions", {"prompt": "x" * 300}, "prompt", "max_model_len"),
    ("/v1/completions", {"prompt": "x" * 20, "max_tokens": 250}, "max_tokens",
     "maximum context length is 256 tokens"),
    ("/v1/chat/completions", {"messages": CONVERSATION, "max_completion_tokens": 256},
     "max_completion_tokens", "in the completion"),
    ("/v1/chat/completions", {"messages": []}, "messages", "non-empty"),
    ("/v1/chat/completions", {"messages": [{"role": "tool", "content": "x"}]}, "messages",
     "no tools here"),
    ("/v1/chat/completions", {"messages": [{"content": "x"}]}, "messages.0.role", "required"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * 70_000}]},
     "messages", "before templating"),
    ("/v1/chat/completions", {"messages": CONVERSATION, "top_logprobs": 2}, "top_logprobs",
     "logprobs: true"),
    ("/v1/chat/completions", {"messages": CONVERSATION, "max_completion_tokens": -1},
     "max_completion_tokens", ">= 1"),
    ("/detokenize", {"tokens": [5, 1000]}, "tokens", "vocabulary"),
])
def test_bad_requests_are_400_naming_the_field(api, path, body, param, says):
    error = _error(post(api.base_url + path, json=body), 400)
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param or error["param"].startswith(param + "."), error
    if says is not None:
        assert says in error["message"], error
    if says == "max_model_len" or "completion" in (says or ""):
        assert error["code"] == "context_length_exceeded"


def test_other_errors_have_their_codes(api, client):
    assert _error(post(api.base_url + "/v1/completions", content=b"{not json"),
                  400)["message"].startswith("the request body is not valid JSON")
    assert "JSON object" in _error(post(api.base_url + "/v1/completions", json=[1]),
                                   400)["message"]
    error = _error(post(api.base_url + "/v1/completions",
                              json={"model": "gpt-4", "prompt": "x"}), 404, "model")
    assert error["code"] == "model_not_found" and "`gpt-4`" in error["message"]
    _error(get(api.base_url + "/v1/nothing"), 404)
    assert _error(get(api.base_url + "/v1/completions"), 405)["type"] == "invalid_request_error"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="x")
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="tiny", messages=CONVERSATION, temperature=7e3)
    assert bad.value.body["param"] == "temperature"
    assert api.wait_idle()


def _slow_engine_factory(model_dir: str, step_s: float):
    """Engines whose steps take at least step_s: a stream then outlasts the test's next call."""
    def build():
        engine = templated_engine_factory(model_dir)()
        step = engine.step
        engine.step = lambda: (time.sleep(step_s), step())[1]
        return engine
    return build


def test_auth_body_limit_a_full_queue_and_the_access_log(model_dir, caplog):
    caplog.set_level(logging.INFO, logger="jaxserve.access")
    server = HttpServerThread(_slow_engine_factory(model_dir, 0.01), auth_token="sesame",
                              max_pending=1, max_message_bytes=1024, access_log=True)
    try:
        url = server.base_url + "/v1/completions"
        ok = {"Authorization": "Bearer sesame"}
        body = {"prompt": "x", "max_tokens": 2}
        assert _error(post(url, json=body), 401)["code"] == "invalid_api_key"
        _error(post(url, json=body, headers={"Authorization": "Bearer nope"}), 401)
        _error(get(server.base_url + "/metrics"), 401)
        assert post(url, json=body, headers=ok).status_code == 200
        too_big = _error(post(url, json={"prompt": "x" * 2000}, headers=ok), 413)
        assert "1024" in too_big["message"]
        chunked = post(url, headers=ok, content=iter([b'{"prompt": "', b"x" * 2000, b'"}']))
        _error(chunked, 413)
        # One request in flight fills max_pending=1: the next gets 429 and Retry-After.
        with httpx.stream("POST", url, headers=ok, timeout=30,
                          json={"prompt": "x", "max_tokens": 200, "ignore_eos": True,
                                "stream": True}) as stream:
            lines = stream.iter_lines()  # (kept: a dropped iterator closes the stream)
            next(lines)
            full = post(url, json=body, headers=ok)
            _error(full, 429)
            assert int(full.headers["Retry-After"]) >= 1
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="sesame", max_retries=0)
        assert server.wait_idle()
        assert client.completions.create(model=server.engine.model_path, prompt="x",
                                         max_tokens=2).usage.completion_tokens == 2
        metrics = get(server.base_url + "/metrics", headers=ok).text
        assert 'jaxserve_unauthenticated_calls_total{endpoint="http"} 3.0' in metrics
        lines = [r.getMessage() for r in caplog.records if r.name == "jaxserve.access"]
        assert any(re.fullmatch(r"http /v1/completions request=\d+ status=200 prompt_tokens=2 "
                                r"cached_tokens=\d+ output_tokens=2 finish=length e2e=\S+", line)
                   for line in lines), lines
        assert any(line.startswith("http /v1/completions request=- status=429") for line in lines)
    finally:
        server.close()


def test_streams_are_server_sent_events(api):
    with httpx.stream("POST", api.base_url + "/v1/chat/completions", timeout=30, json={
            "messages": CONVERSATION, "max_tokens": 3, "stream": True}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    assert json.loads(lines[0][6:])["choices"][0]["delta"] == {"role": "assistant",
                                                                "content": ""}


def test_benchmark_serving_drives_the_http_api(api, tmp_path):
    """tools/benchmark_serving --backend=openai: every request completes with exactly its
    output tokens, counted from the stream's usage, and the record lands in --out_dir."""
    lengths = ["--num_requests=6", "--request_rate=inf", "--prompt_len_median=8",
               "--max_prompt_len=32", "--output_len_median=8", "--max_output_len=32"]
    result = subprocess.run(
        [sys.executable, "-m", "tools.benchmark_serving", "--backend=openai",
         f"--base_url={api.base_url}/v1", f"--out_dir={tmp_path}", "--out_png=", *lengths],
        cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
        timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "requests completed / failed     6 / 0" in result.stdout, result.stdout
    (record,) = tmp_path.glob("serving-openai-*.json")
    run = json.loads(record.read_text())
    assert run["model"]["served_model"] == "tiny"
    spec = dict(num_requests=6, rate=math.inf, prompt_len_median=8.0, max_prompt_len=32,
                output_len_median=8.0, max_output_len=32, vocab_size=api.engine.model_config.vocab_size)
    expected = [r.output_len for r in generate_workload(WorkloadSpec(**spec))]
    assert [r["output_tokens"] for r in run["requests"]] == expected


def test_null_optional_fields_take_their_defaults(api):
    """OpenAI and vLLM take null for an optional field as its default, as clients that
    serialize every field send it: stream, echo, logprobs and include_usage included."""
    nulls = {"stream": None, "stream_options": None, "n": None, "stop": None, "seed": None,
             "max_tokens": 2}
    response = post(api.base_url + "/v1/completions",
                    json={"prompt": "x", "echo": None, "logprobs": None, **nulls})
    assert response.status_code == 200, response.text
    response = post(api.base_url + "/v1/chat/completions",
                    json={"messages": CONVERSATION, "logprobs": None, "top_logprobs": None,
                          **nulls})
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["logprobs"] is None
    with httpx.stream("POST", api.base_url + "/v1/completions", timeout=60, json={
            "prompt": "x", "max_tokens": 2, "stream": True,
            "stream_options": {"include_usage": None}}) as stream:
        lines = [line for line in stream.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and "usage" not in json.loads(lines[-2][6:])
