-- wrk: GET /data filtered by a name fragment no asset has and no request asked before: a full scan of the assets
-- (count and page) on a reader's thread, which nothing kept serves.
local threads = 0

setup = function(thread)
  threads = threads + 1
  thread:set("first", threads * 1000000000)
end

local n
init = function()
  n = first
end

request = function()
  n = n + 1
  return wrk.format("GET", "/data?page_size=5&filter_by=name~" .. n .. "x")
end
