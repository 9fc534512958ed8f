import asyncio, time, collections, sys
from hypothesis import HealthCheck, Phase, settings, given
import schemathesis
from schemathesis import GenerationMode
from fake_openai import FakeOpenAI, EMBEDDER

N = int(__import__("os").environ.get("N", "60"))

def fuzz(url, headers, n):
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    seen = {}
    fails = collections.Counter()
    examples = {}
    for result in schema.get_all_operations():
        op = result.ok()
        if op.label == "GET /admin/feed":
            continue
        for mode in GenerationMode:
            @settings(max_examples=n, deadline=None, database=None, suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
            @given(case=op.as_strategy(generation_mode=mode))
            def run(case):
                r = case.call(base_url=url, headers=headers, timeout=20)
                seen.setdefault(op.label, collections.Counter())[r.status_code] += 1
                if r.status_code >= 500:
                    k = (op.label, r.status_code, r.text[:90])
                    fails[k] += 1
                    examples.setdefault(k, case.as_curl_command(headers=headers))
            try:
                run()
            except Exception as e:
                if "Unsatisfiable" not in type(e).__name__:
                    print("ERR", op.label, mode, type(e).__name__, str(e)[:300])
    return seen, fails, examples


async def test_explore(gw_island):
    fake = FakeOpenAI(api_key="sk")
    await fake.start()
    try:
        cfg = {"backend": "openai", "openai": {"url": fake.url, "api_key": "sk", "embedding_model": EMBEDDER, "transcription_model": "whisper-1"}}
        await gw_island.make_agent("oai", roles=("inference",), plugins={"inference": cfg}, heartbeat=0.2)
        await gw_island.models_seen("fake-base")
        for hdr in ({"Authorization": f"Bearer {gw_island.admin_key}"}, {}):
            t = time.monotonic()
            seen, fails, ex = await asyncio.to_thread(fuzz, gw_island.url, hdr, N)
            print("TOTAL", time.monotonic() - t, bool(hdr))
            for k, v in seen.items(): print("  ", k, dict(v))
            for k, v in fails.items():
                if "no inference node serves embeddings" in k[2]: 
                    print("FAIL", k, v); continue
                print("FAIL", k, v, ex[k][:1500])
    finally:
        await fake.stop()
