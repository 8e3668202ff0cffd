"""Serving: the OpenAI-compatible API (`protocol`, `app`, `openai_server`), one request's
select -> train -> generate flow (`pipeline`), the engines that answer (`engines/`), the plain services
and the Ray Serve deployments around them (`services`, `deployments`), the configuration model
(`config`) and the `sift-serve` command line (`cli`)."""
