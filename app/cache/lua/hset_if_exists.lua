-- Set one field of a hash only when the hash still exists: a transformer vector computed for an L2 candidate
-- must not re-create an entry that expired meanwhile (as a hash without a TTL, kept for ever).
-- KEYS[1] the entry hash; ARGV[1] field, ARGV[2] value. Returns 1 when set, 0 when the entry is gone.
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
  return 1
end
return 0
