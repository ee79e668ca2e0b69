-- wrk: GET /data at a uniformly random page in 1..$BENCH_PAGES (default 10000), 100 assets a page.
local pages = tonumber(os.getenv("BENCH_PAGES") or "10000")
math.randomseed(7)

request = function()
  return wrk.format("GET", "/data?page=" .. math.random(1, pages) .. "&page_size=100")
end
