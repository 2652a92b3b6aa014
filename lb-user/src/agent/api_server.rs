//! Serves the HTTP API (`agent.api_listen`, see `crate::http_api`): each
//! route checks the bearer token, builds the control request and hands it
//! to the same handler as the Unix socket.

use std::{collections::HashMap, net::SocketAddr, sync::Arc};

use axum::{
    body::Bytes,
    extract::{ConnectInfo, Query},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use tokio::sync::Notify;

use crate::api;
use crate::http_api::{
    Access, Method, OPENAPI_PATH, Op, ROUTES, Route, document_text, tokens::TokenFile,
};

use super::Shared;
use super::control::handle;

/// What every route's handler shares.
struct Ctx {
    shared: Shared,
    stop: Arc<Notify>,
    tokens: TokenFile,
}

fn answer(code: StatusCode, r: &api::Response) -> Response {
    let body = serde_json::to_string(r).unwrap_or_else(|_| "{\"ok\":false}".into());
    let mut resp = (code, [(header::CONTENT_TYPE, "application/json")], body).into_response();
    if code == StatusCode::UNAUTHORIZED {
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer realm=\"lb\""),
        );
    }
    resp
}

fn refuse(code: StatusCode, error: String) -> Response {
    answer(
        code,
        &api::Response {
            ok: false,
            error: Some(error),
            data: Default::default(),
        },
    )
}

async fn call(
    ctx: Arc<Ctx>,
    route: &'static Route,
    peer: SocketAddr,
    query: HashMap<String, String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let tokens = match ctx.tokens.current() {
        Ok(t) => t,
        // The reason stays in the agent's log (`TokenFile::current` logs
        // it): it may quote the file, and this client has shown no token.
        Err(_) => {
            return refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                "the API's token file does not check out (the agent's log says why); fix it, no \
                 restart needed"
                    .into(),
            );
        }
    };
    let auth = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let Some(token) = tokens.find(auth) else {
        tracing::warn!(%peer, path = route.path, "API request without a valid token refused");
        return refuse(
            StatusCode::UNAUTHORIZED,
            "no valid bearer token: send `Authorization: Bearer TOKEN` with a token from \
             agent.api_token_file"
                .into(),
        );
    };
    if token.access < route.access {
        return refuse(
            StatusCode::FORBIDDEN,
            format!(
                "`{}` is a read-only token; {} {} changes the configuration and needs a \
                 read-write one",
                token.name,
                route.method.name().to_uppercase(),
                route.path
            ),
        );
    }
    let req = match route.op.request(&query, &body) {
        Ok(r) => r,
        Err(e) => return refuse(StatusCode::BAD_REQUEST, format!("bad request: {e}")),
    };
    if route.access == Access::Write {
        tracing::info!(token = %token.name, %peer, path = route.path, "API change requested");
    }
    let sh = ctx.shared.clone();
    let r = tokio::task::spawn_blocking(move || handle(&sh, req)).await;
    match r {
        Ok(Ok(data)) => {
            if route.op == Op::Shutdown {
                // After the answer has left: the agent stops as `lb down`
                // asks it to.
                let stop = ctx.stop.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                    stop.notify_one();
                });
            }
            answer(
                StatusCode::OK,
                &api::Response {
                    ok: true,
                    error: None,
                    data,
                },
            )
        }
        Ok(Err(e)) => refuse(StatusCode::BAD_REQUEST, format!("{e:#}")),
        Err(e) => refuse(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

pub(super) async fn serve_http_api(
    listener: tokio::net::TcpListener,
    shared: Shared,
    stop: Arc<Notify>,
    tokens: TokenFile,
) {
    let ctx = Arc::new(Ctx {
        shared,
        stop,
        tokens,
    });
    let doc = document_text();
    let mut app = axum::Router::new().route(
        OPENAPI_PATH,
        get(move || async move { ([(header::CONTENT_TYPE, "application/json")], doc) }),
    );
    for route in ROUTES {
        let ctx = ctx.clone();
        let h = move |ConnectInfo(peer): ConnectInfo<SocketAddr>,
                      Query(query): Query<HashMap<String, String>>,
                      headers: HeaderMap,
                      body: Bytes| { call(ctx, route, peer, query, headers, body) };
        app = app.route(
            route.path,
            match route.method {
                Method::Get => get(h),
                Method::Post => post(h),
            },
        );
    }
    let app = app.fallback(|| async {
        refuse(
            StatusCode::NOT_FOUND,
            format!("no such route; {OPENAPI_PATH} lists them"),
        )
    });
    if let Err(e) = axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .await
    {
        tracing::error!(error = %e, "HTTP API server stopped");
    }
}
