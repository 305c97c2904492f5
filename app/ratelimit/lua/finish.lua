-- finish.lua: settle a request's token estimate and/or give its concurrency slots back.
--
-- KEYS[1..m]         token (GCRA) keys the request reserved on; all share the tenant's hash tag
-- KEYS[m+1..]        concurrency sets holding the request
-- ARGV[1]            request id
-- ARGV[2]            token correction: actual - reserved (positive consumes more, negative gives back)
-- ARGV[3]            m, the number of token keys
-- ARGV[4+2(i-1)..]   per token key: limit, window (us)
--
-- The correction moves the TAT (see acquire.lua) by delta * T.  It starts from max(TAT, now) because a
-- full bucket has no debt to repay; if the TAT lands at or before now the bucket is full and the key goes.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local request_id = ARGV[1]
local delta = tonumber(ARGV[2])
local m = tonumber(ARGV[3])

if delta ~= 0 then
  for i = 1, m do
    local limit = tonumber(ARGV[2 + 2 * i])
    local window = tonumber(ARGV[3 + 2 * i])
    local key = KEYS[i]
    local tat = tonumber(redis.call('GET', key) or now)
    if tat < now then tat = now end
    local new_tat = tat + delta * (window / limit)
    if new_tat <= now then
      redis.call('DEL', key)
    else
      local ttl = math.ceil((new_tat - now) / 1000)
      redis.call('SET', key, string.format('%.17g', new_tat), 'PX', ttl)
    end
  end
end

for i = m + 1, #KEYS do
  -- ZREM of the last member deletes the set, so an idle tenant leaves nothing behind.
  redis.call('ZREM', KEYS[i], request_id)
end

return 1
