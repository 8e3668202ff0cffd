"""Serving: the OpenAI-compatible API (`protocol`, `app`, `openai_server`), one request's
select -> train -> generate flow (`pipeline`), documents placed in the prompt (`context`), the engines
that answer (`engines/`), the plain services and the Ray Serve deployments around them (`services`,
`deployments`, one per index shard when the index is sharded), one calling convention over local objects
and handles with 503s for parts that are down (`clients`, `availability`), the server's metrics
(`metrics`), the generated Ray Serve config (`serve_config`), the configuration model (`config`) and the
`sift-serve` command line (`cli`)."""
