"""The cluster: featurizing spread over machines through a Redis job queue (Dramatiq).

- broker: the wire -- the Redis connection, the jobs, the answers, the keys.
- coordinator: the daemon's side -- jobs out, answers in, taken at most once; what is not
  answered in time is sent again or done here.
- worker: `wardrobe worker` -- takes jobs, featurizes on its own decode workers, answers.
"""
