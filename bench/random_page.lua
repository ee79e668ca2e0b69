-- wrk: GET /data at a uniformly random page in 1..$BENCH_PAGES (default 10000), 100 assets a page.
local pages = tonumber(os.getenv("BENCH_PAGES") or "10000")
-- $BENCH_SEED: the warm-up and the measured run draw different pages (api_bench.py sets 7, then 8), so the
-- measured run does not ask again, in order, for the pages the warm-up left kept.
math.randomseed(tonumber(os.getenv("BENCH_SEED") or "7"))

request = function()
  return wrk.format("GET", "/data?page=" .. math.random(1, pages) .. "&page_size=100")
end
