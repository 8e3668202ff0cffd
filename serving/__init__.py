"""Serving: the OpenAI-compatible API (`protocol/` for the wire models, `app` for FastAPI, `openai_server`
for the routes' logic, `playground/` for the static page that shows one request learning), the
request-level contract every layer shares (`contracts`: the resolved `AdaptationSpec` and `resolve`,
`SelectQuery`, `MergeQuery`, `GenerateRequest`, `Chunk`, `Readiness`), one request's
[merge ->] select -> train -> generate flow as immutable events (`pipeline`, `events`) and the format layer that
answers from them (`stream`, `report`, `formats`, `sse`), prompts and documents placed in them (`prompts`,
`context`), the engines that answer (`engines/`), the plain services and the Ray Serve deployments around
them (`services`, `deployments`, one per index shard when the index is sharded), the typed service
protocols over local objects and handles with 503s for parts that are down (`clients`, `availability`),
the server's metrics (`metrics`), the generated Ray Serve config (`serve_config`), the configuration model
(`config`) and the `sift-serve` command line (`cli`)."""
