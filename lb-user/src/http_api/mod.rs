//! The HTTP API (`agent.api_listen`): the control socket's operations as
//! JSON over HTTP, for automation. One table ([`ROUTES`]) names every
//! route, the control request it becomes and the access it needs; the
//! agent's router and the OpenAPI 3.1 document ([`document`], checked in as
//! `dist/openapi.json` and served at `/api/openapi.json`) are both built
//! from it, so neither can list a route the other lacks. Requests become
//! the very [`Request`]s the Unix socket carries: same validation, same
//! write-back to the file, same errors. Answers are the socket's envelope,
//! `{"ok": true, "data": …}` or `{"ok": false, "error": "…"}`.

pub mod tokens;

use std::collections::HashMap;

use schemars::{Schema, SchemaGenerator, generate::SchemaSettings};
use serde_json::{Value, json};

use crate::api::{
    BackendInfo, Edit, ExplainInfo, Request, StatsInfo, StatusInfo, VipInfo, VipRef, WhatIfInfo,
};

/// What a route needs from its token.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Access {
    /// Reads (and predictions, which change nothing).
    Read,
    /// Changes: edits, reloads, drain, shutdown.
    Write,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Get,
    Post,
}

impl Method {
    pub fn name(self) -> &'static str {
        match self {
            Method::Get => "get",
            Method::Post => "post",
        }
    }
}

/// The control operation behind a route.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Status,
    Vips,
    Backends,
    Health,
    Stats,
    Explain,
    WhatIf,
    Edit,
    Reload,
    NodeDrain,
    NodeResume,
    Shutdown,
}

/// One route of the API.
#[derive(Clone, Copy, Debug)]
pub struct Route {
    pub method: Method,
    pub path: &'static str,
    pub op: Op,
    pub access: Access,
    /// `operationId` in the OpenAPI document.
    pub id: &'static str,
    pub summary: &'static str,
    /// The CLI command doing the same over the Unix socket.
    pub cli: &'static str,
}

/// Where the OpenAPI document is served (without a token: it holds no
/// state of this agent).
pub const OPENAPI_PATH: &str = "/api/openapi.json";

/// Every route of the API, in the order the document lists them.
pub const ROUTES: &[Route] = &[
    Route {
        method: Method::Get,
        path: "/api/v1/status",
        op: Op::Status,
        access: Access::Read,
        id: "status",
        summary: "The agent: version, interface, counts, announcement, ring digests, capacity.",
        cli: "lb status",
    },
    Route {
        method: Method::Get,
        path: "/api/v1/vips",
        op: Op::Vips,
        access: Access::Read,
        id: "listVips",
        summary: "Every VIP with its forwarding, scheduler and backend counts.",
        cli: "lb vip list",
    },
    Route {
        method: Method::Get,
        path: "/api/v1/backends",
        op: Op::Backends,
        access: Access::Read,
        id: "listBackends",
        summary: "Backends (of one VIP with `vip`) with state, weight and last probe.",
        cli: "lb backend list [VIP]",
    },
    Route {
        method: Method::Get,
        path: "/api/v1/health",
        op: Op::Health,
        access: Access::Read,
        id: "health",
        summary: "Every backend's health: state, last result and latency, transitions.",
        cli: "lb health",
    },
    Route {
        method: Method::Get,
        path: "/api/v1/stats",
        op: Op::Stats,
        access: Access::Read,
        id: "stats",
        summary: "Traffic per VIP and backend, verdict counters.",
        cli: "lb stats",
    },
    Route {
        method: Method::Get,
        path: "/api/v1/explain",
        op: Op::Explain,
        access: Access::Read,
        id: "explain",
        summary: "Which backend a client's connection to a VIP goes to now, and why.",
        cli: "lb explain VIP CLIENT",
    },
    Route {
        method: Method::Post,
        path: "/api/v1/what-if",
        op: Op::WhatIf,
        access: Access::Read,
        id: "whatIf",
        summary: "What an edit would do to a VIP's ring and flows; changes nothing.",
        cli: "lb explain --what-if EDIT",
    },
    Route {
        method: Method::Post,
        path: "/api/v1/edit",
        op: Op::Edit,
        access: Access::Write,
        id: "edit",
        summary: "Apply one change (VIP or backend add, remove, set): validated, applied, saved to the file.",
        cli: "lb vip ... / lb backend ...",
    },
    Route {
        method: Method::Post,
        path: "/api/v1/reload",
        op: Op::Reload,
        access: Access::Write,
        id: "reload",
        summary: "Read the configuration file again and apply the difference.",
        cli: "lb reload",
    },
    Route {
        method: Method::Post,
        path: "/api/v1/node/drain",
        op: Op::NodeDrain,
        access: Access::Write,
        id: "nodeDrain",
        summary: "Withdraw every VIP announcement (the node keeps forwarding).",
        cli: "lb node drain",
    },
    Route {
        method: Method::Post,
        path: "/api/v1/node/resume",
        op: Op::NodeResume,
        access: Access::Write,
        id: "nodeResume",
        summary: "Announce again what this node can serve.",
        cli: "lb node resume",
    },
    Route {
        method: Method::Post,
        path: "/api/v1/shutdown",
        op: Op::Shutdown,
        access: Access::Write,
        id: "shutdown",
        summary: "Stop the agent (the datapath keeps forwarding, as with SIGTERM).",
        cli: "lb down, its first step",
    },
];

/// A query parameter of a route: name, description, example.
type Param = (&'static str, &'static str, &'static str);

impl Op {
    fn params(self) -> &'static [(Param, bool)] {
        const VIP: Param = (
            "vip",
            "A VIP as ADDRESS:PORT[/tcp|udp]",
            "198.18.0.100:80/tcp",
        );
        const CLIENT: Param = ("client", "The client as ADDRESS:PORT", "198.18.1.1:40000");
        match self {
            Op::Backends => &[(VIP, false)],
            Op::Explain => &[(VIP, true), (CLIENT, true)],
            _ => &[],
        }
    }

    /// The control request for this route, from its query and body.
    pub fn request(self, query: &HashMap<String, String>, body: &[u8]) -> Result<Request, String> {
        if let Some(k) = query
            .keys()
            .find(|k| !self.params().iter().any(|p| p.0.0 == *k))
        {
            return Err(format!("unknown query parameter `{k}`"));
        }
        let param = |name: &str| -> Result<Option<&String>, String> { Ok(query.get(name)) };
        let required = |name: &str| -> Result<&String, String> {
            param(name)?.ok_or_else(|| format!("the query parameter `{name}` is required"))
        };
        let vip = |s: &String| s.parse::<VipRef>().map_err(|e| format!("vip: {e}"));
        let edit = || -> Result<Edit, String> {
            serde_json::from_slice(body).map_err(|e| {
                format!("the body is not an edit ({e}); see the `Edit` schema in {OPENAPI_PATH}")
            })
        };
        if !matches!(self, Op::Edit | Op::WhatIf) && !body.iter().all(u8::is_ascii_whitespace) {
            return Err("this route takes no body".into());
        }
        Ok(match self {
            Op::Status => Request::Status,
            Op::Vips => Request::VipList,
            Op::Backends => Request::BackendList {
                vip: param("vip")?.map(vip).transpose()?,
            },
            Op::Health => Request::Health,
            Op::Stats => Request::Stats,
            Op::Explain => Request::Explain {
                vip: vip(required("vip")?)?,
                client: required("client")?
                    .parse()
                    .map_err(|_| "client: not an ADDRESS:PORT such as 198.18.1.1:40000")?,
            },
            Op::WhatIf => Request::WhatIf { edit: edit()? },
            Op::Edit => Request::Edit(edit()?),
            Op::Reload => Request::Reload,
            Op::NodeDrain => Request::NodeDrain,
            Op::NodeResume => Request::NodeResume,
            Op::Shutdown => Request::Shutdown,
        })
    }

    /// The schema of `data` in a successful answer.
    fn data_schema(self, g: &mut SchemaGenerator) -> Schema {
        match self {
            Op::Status => g.subschema_for::<StatusInfo>(),
            Op::Vips => g.subschema_for::<Vec<VipInfo>>(),
            Op::Backends | Op::Health => g.subschema_for::<Vec<BackendInfo>>(),
            Op::Stats => g.subschema_for::<StatsInfo>(),
            Op::Explain => g.subschema_for::<ExplainInfo>(),
            Op::WhatIf => g.subschema_for::<WhatIfInfo>(),
            Op::Edit | Op::Reload | Op::NodeDrain | Op::NodeResume | Op::Shutdown => {
                schemars::json_schema!({"type": "null"})
            }
        }
    }
}

/// The route of a method and path, if the API has one.
pub fn route(method: Method, path: &str) -> Option<&'static Route> {
    ROUTES.iter().find(|r| r.method == method && r.path == path)
}

/// The OpenAPI 3.1 document of [`ROUTES`]; `dist/openapi.json` is this,
/// pretty-printed (a unit test keeps them equal).
pub fn document() -> Value {
    let mut g = SchemaSettings::draft2020_12()
        .with(|s| {
            s.definitions_path = "/components/schemas".into();
            s.meta_schema = None;
        })
        .into_generator();
    let edit = g.subschema_for::<Edit>();
    let mut paths = serde_json::Map::new();
    for r in ROUTES {
        let data = r.op.data_schema(&mut g);
        let params: Vec<Value> =
            r.op.params()
                .iter()
                .map(|((name, what, example), required)| {
                    json!({
                        "name": name, "in": "query", "required": required, "description": what,
                        "schema": {"type": "string"}, "example": example,
                    })
                })
                .collect();
        let access = match r.access {
            Access::Read => "read-only or read-write token",
            Access::Write => "read-write token",
        };
        let mut op = json!({
            "operationId": r.id,
            "summary": r.summary,
            "description": format!("Needs a {access}. The same as `{}`.", r.cli),
            "x-lb-access": match r.access { Access::Read => "read", Access::Write => "write" },
            "security": [{"bearer": []}],
            "responses": {
                "200": {
                    "description": "Done.",
                    "content": {"application/json": {"schema": {
                        "type": "object",
                        "required": ["ok", "data"],
                        "properties": {"ok": {"const": true}, "data": data},
                    }}},
                },
                "400": {"$ref": "#/components/responses/Refused"},
                "401": {"$ref": "#/components/responses/Unauthorized"},
                "503": {"$ref": "#/components/responses/Unavailable"},
            },
        });
        if !params.is_empty() {
            op["parameters"] = params.into();
        }
        if matches!(r.op, Op::Edit | Op::WhatIf) {
            op["requestBody"] = json!({
                "required": true,
                "content": {"application/json": {"schema": edit}},
            });
        }
        if r.access == Access::Write {
            op["responses"]["403"] = json!({"$ref": "#/components/responses/ReadOnly"});
        }
        let entry = paths.entry(r.path.to_string()).or_insert_with(|| json!({}));
        entry[r.method.name()] = op;
    }
    paths.insert(
        OPENAPI_PATH.into(),
        json!({"get": {
            "operationId": "openapi",
            "summary": "This document (no token needed).",
            "security": [],
            "responses": {"200": {
                "description": "The OpenAPI document.",
                "content": {"application/json": {"schema": {"type": "object"}}},
            }},
        }}),
    );
    let error = json!({"content": {"application/json": {"schema": {
        "$ref": "#/components/schemas/Error"
    }}}});
    let with = |what: &str| {
        let mut e = error.clone();
        e["description"] = what.into();
        e
    };
    let mut schemas: serde_json::Map<String, Value> = g.take_definitions(true);
    schemas.insert(
        "Error".into(),
        json!({
            "type": "object",
            "required": ["ok", "error"],
            "properties": {
                "ok": {"const": false},
                "error": {"type": "string", "description": "What is wrong and what to do, as the CLI says it."},
            },
        }),
    );
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "lb control API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "The agent's control operations over HTTP (`agent.api_listen`), the same as \
                the `lb` CLI's over the Unix socket. Every request but this document's needs \
                `Authorization: Bearer TOKEN` with a token from `agent.api_token_file`; reads take a \
                read-only or read-write token, changes a read-write one. An answer is \
                `{\"ok\": true, \"data\": ...}` or `{\"ok\": false, \"error\": \"...\"}`.",
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "responses": {
                "Refused": with("Refused (a bad request, a change that does not validate): nothing changed."),
                "Unauthorized": with("No token, or one the token file does not hold."),
                "ReadOnly": with("A read-only token on a route that changes something."),
                "Unavailable": with("The token file does not check out (mode, owner, syntax): every request is refused until it is fixed; the agent's log says why."),
            },
        },
    })
}

/// [`document`] as checked in and served: pretty JSON and a final newline.
pub fn document_text() -> String {
    let mut s = serde_json::to_string_pretty(&document()).expect("the document serializes");
    s.push('\n');
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `dist/openapi.json` is the document the agent serves. After a change
    /// to the API types or routes, `LB_WRITE_OPENAPI=1 cargo test -p lb-user
    /// openapi` writes it again.
    #[test]
    fn the_checked_in_openapi_document_is_current() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../dist/openapi.json");
        let now = document_text();
        if std::env::var_os("LB_WRITE_OPENAPI").is_some() {
            std::fs::write(path, &now).unwrap();
        }
        let file = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            file == now,
            "dist/openapi.json is not the document the agent serves: run \
             `LB_WRITE_OPENAPI=1 cargo test -p lb-user openapi` and commit it"
        );
    }

    #[test]
    fn every_route_is_unique_and_in_the_document() {
        let doc = document();
        for r in ROUTES {
            assert_eq!(
                ROUTES
                    .iter()
                    .filter(|o| o.method == r.method && o.path == r.path)
                    .count(),
                1
            );
            assert!(doc["paths"][r.path][r.method.name()].is_object(), "{r:?}");
        }
    }

    #[test]
    fn requests_from_query_and_body() {
        let q = |kv: &[(&str, &str)]| -> HashMap<String, String> {
            kv.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        assert!(matches!(
            Op::Backends.request(&q(&[("vip", "198.18.0.100:80")]), b""),
            Ok(Request::BackendList { vip: Some(_) })
        ));
        let e = Op::Backends
            .request(&q(&[("vip", "198.18.0.100")]), b"")
            .unwrap_err();
        assert!(e.contains("ADDRESS:PORT"), "{e}");
        let e = Op::Status.request(&q(&[("x", "1")]), b"").unwrap_err();
        assert!(e.contains("unknown query parameter `x`"), "{e}");
        let e = Op::Explain
            .request(&q(&[("vip", "198.18.0.100:80")]), b"")
            .unwrap_err();
        assert!(e.contains("`client` is required"), "{e}");
        let e = Op::Edit
            .request(&q(&[]), b"{\"edit\":\"nope\"}")
            .unwrap_err();
        assert!(e.contains("the body is not an edit"), "{e}");
        assert!(Op::Reload.request(&q(&[]), b"{}").is_err());
        assert!(matches!(
            Op::Edit.request(
                &q(&[]),
                br#"{"edit":"backend-remove","vip":"198.18.0.100:80","address":"198.18.2.1"}"#
            ),
            Ok(Request::Edit(Edit::BackendRemove { .. }))
        ));
    }
}
