-- wrk: GET /data/{asset_id} for a random id of the file $BENCH_IDS (one real asset_id a line).
local ids = {}
for line in io.lines(os.getenv("BENCH_IDS")) do
  ids[#ids + 1] = line
end
assert(#ids > 0, "no asset ids in " .. os.getenv("BENCH_IDS"))
math.randomseed(7)

request = function()
  return wrk.format("GET", "/data/" .. ids[math.random(1, #ids)])
end
