//! Persisting rotated refresh tokens.
//!
//! xAI's refresh tokens are single-use: every refresh spends the old one and hands out a new
//! one. This example loads a credential from a JSON file, subscribes to refreshed credentials
//! with `Credentials::subscribe`, and writes each one back with an atomic replace (a temporary
//! file in the same directory, then a rename; permissions 0600 on unix), so that the next start
//! presents the refresh token the endpoint expects.
//!
//! It needs no network: a token endpoint that rotates refresh tokens like xAI's runs on
//! 127.0.0.1, and a stand-in for the API only accepts access tokens that endpoint issued in this
//! run, so every start begins with a stale token, refreshes once and persists the rotation.
//!
//! ```text
//! cargo run --example persist [path/to/credential.json]
//! cargo run --example persist [path/to/credential.json]   # again: it goes on from the stored one
//! ```

use std::collections::HashSet;
use std::convert::Infallible;
use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::{Deserialize, Serialize};
use tower::{service_fn, BoxError, Service, ServiceBuilder, ServiceExt};
use xai_oauth_recovery::body::RequestBody;
use xai_oauth_recovery::{
    Credential, Credentials, OAuth2Refresher, RecoveryReport, XaiOAuthRecoveryLayer,
};

/// The file format. Tokens are secrets: this type has no `Debug` and is never printed.
#[derive(Serialize, Deserialize)]
struct Stored {
    id: String,
    access_token: String,
    refresh_token: Option<String>,
    /// Seconds since the Unix epoch.
    expires_at: Option<u64>,
}

impl Stored {
    fn from_credential(credential: &Credential) -> Self {
        Self {
            id: credential.id().to_owned(),
            access_token: credential.access_token().secret().to_owned(),
            refresh_token: credential.refresh_token().map(|t| t.secret().to_owned()),
            expires_at: credential
                .expires_at()
                .and_then(|at| at.duration_since(SystemTime::UNIX_EPOCH).ok())
                .map(|since| since.as_secs()),
        }
    }

    fn into_credential(self) -> Credential {
        let mut credential = Credential::new(self.id, self.access_token);
        if let Some(refresh_token) = self.refresh_token {
            credential = credential.with_refresh_token(refresh_token);
        }
        if let Some(at) = self.expires_at {
            credential =
                credential.with_expires_at(SystemTime::UNIX_EPOCH + Duration::from_secs(at));
        }
        credential
    }
}

/// The stored credential, or `None` when there is no file yet.
fn load(path: &Path) -> io::Result<Option<Credential>> {
    let bytes = match fs::read(path) {
        Ok(bytes) => bytes,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(error),
    };
    let stored: Stored = serde_json::from_slice(&bytes)?;
    Ok(Some(stored.into_credential()))
}

/// Replaces the stored credential atomically: readers see the old file or the new one, never a
/// half-written one, and a crash mid-write leaves the old one in place.
fn save(path: &Path, credential: &Credential) -> io::Result<()> {
    let json = serde_json::to_vec_pretty(&Stored::from_credential(credential))?;
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .unwrap_or(path.as_os_str())
        .to_string_lossy();
    // The same directory, so that the rename stays on one file system.
    let tmp = dir.join(format!(".{name}.tmp"));
    match fs::remove_file(&tmp) {
        Err(error) if error.kind() != io::ErrorKind::NotFound => return Err(error),
        _ => {}
    }
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        // Only the user may read refresh tokens.
        options.mode(0o600);
    }
    let mut file = options.open(&tmp)?;
    file.write_all(&json)?;
    file.sync_all()?;
    drop(file);
    fs::rename(&tmp, path)?;
    // Make the rename itself durable.
    #[cfg(unix)]
    fs::File::open(dir)?.sync_all()?;
    Ok(())
}

/// What the local token endpoint and the API stand-in share: the access tokens issued so far.
type Issued = Arc<Mutex<HashSet<String>>>;

/// A token endpoint on 127.0.0.1 that rotates refresh tokens like xAI's: `refresh-<n>` buys
/// `access-<n+1>` and `refresh-<n+1>`; anything else is `invalid_grant`.
async fn start_token_endpoint(issued: Issued) -> io::Result<http::Uri> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let issued = issued.clone();
            let service =
                hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
                    let issued = issued.clone();
                    async move {
                        let form = request.into_body().collect().await?.to_bytes();
                        let spent = form_urlencoded::parse(&form)
                            .find(|(key, _)| key == "refresh_token")
                            .and_then(|(_, token)| {
                                token.strip_prefix("refresh-")?.parse::<u64>().ok()
                            });
                        let (status, body) = match spent {
                            Some(n) => {
                                let access = format!("access-{}", n + 1);
                                issued
                                    .lock()
                                    .unwrap_or_else(PoisonError::into_inner)
                                    .insert(access.clone());
                                let body = serde_json::json!({
                                    "access_token": access,
                                    "token_type": "Bearer",
                                    "expires_in": 3600,
                                    "refresh_token": format!("refresh-{}", n + 1),
                                });
                                (StatusCode::OK, body.to_string())
                            }
                            None => (
                                StatusCode::BAD_REQUEST,
                                r#"{"error":"invalid_grant"}"#.to_owned(),
                            ),
                        };
                        let mut response = Response::new(Full::new(Bytes::from(body)));
                        *response.status_mut() = status;
                        Ok::<_, hyper::Error>(response)
                    }
                });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service),
            );
        }
    });
    format!("http://{addr}/oauth2/token")
        .parse()
        .map_err(|error| io::Error::new(io::ErrorKind::InvalidInput, error))
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let path = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("xai-oauth-recovery-credential.json"));

    let credential = match load(&path)? {
        Some(credential) => {
            println!(
                "loaded credential `{}` from {}",
                credential.id(),
                path.display()
            );
            credential
        }
        None => {
            println!(
                "no credential at {}: starting from a first sign-in",
                path.display()
            );
            Credential::new("default", "access-0").with_refresh_token("refresh-0")
        }
    };
    let credentials = Credentials::new(credential);

    // Persist every refreshed credential. A refreshed credential is published before any request
    // retries with it, so the file never falls behind what the process uses.
    let mut updates = credentials.subscribe();
    let writer_path = path.clone();
    let writer = tokio::spawn(async move {
        while let Some(credential) = updates.recv().await {
            let path = writer_path.clone();
            // File I/O blocks: keep it off the runtime's worker threads.
            let id = credential.id().to_owned();
            match tokio::task::spawn_blocking(move || save(&path, &credential)).await {
                Ok(Ok(())) => println!(
                    "persisted the refreshed credential `{id}` to {}",
                    writer_path.display()
                ),
                Ok(Err(error)) => eprintln!("could not persist credential `{id}`: {error}"),
                Err(error) => eprintln!("could not persist credential `{id}`: {error}"),
            }
        }
    });

    let issued = Issued::default();
    let token_endpoint = start_token_endpoint(issued.clone()).await?;
    let http = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let refresher =
        OAuth2Refresher::new(http, token_endpoint, "example-client").allow_insecure_loopback();

    // A stand-in for the API: only access tokens issued in this run are valid, so the stored
    // one is stale and the first request has to refresh it.
    let api = service_fn(move |request: Request<RequestBody<Full<Bytes>>>| {
        let issued = issued.clone();
        async move {
            let (parts, body) = request.into_parts();
            body.collect().await?;
            let token = parts
                .headers
                .get("authorization")
                .and_then(|value| value.to_str().ok())
                .and_then(|value| value.strip_prefix("Bearer "))
                .unwrap_or_default();
            let valid = issued
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .contains(token);
            let mut response = Response::new(Full::new(Bytes::from_static(if valid {
                b"{\"ok\":true}"
            } else {
                b"{\"error\":\"unauthenticated\"}"
            })));
            if !valid {
                *response.status_mut() = StatusCode::UNAUTHORIZED;
            }
            Ok::<_, Infallible>(response)
        }
    });

    let mut client = ServiceBuilder::new()
        .layer(XaiOAuthRecoveryLayer::new(credentials.clone(), refresher))
        .service(api);
    let request = Request::post("https://api.x.ai/v1/chat/completions")
        .body(Full::new(Bytes::from_static(b"{\"model\":\"grok-4\"}")))?;
    let response = client.ready().await?.call(request).await?;
    println!("the API answered {}", response.status());
    if let Some(report) = response.extensions().get::<RecoveryReport>() {
        println!("{report}");
    }

    // Dropping every handle on the credentials ends the writer once it has saved everything.
    drop(client);
    drop(credentials);
    writer.await?;

    // The next start goes on from here.
    let stored = load(&path)?.ok_or("nothing was persisted")?;
    println!(
        "stored credential `{}` expires in about {} minutes",
        stored.id(),
        stored
            .expires_at()
            .and_then(|at| at.duration_since(SystemTime::now()).ok())
            .map_or(0, |left| (left.as_secs() + 30) / 60)
    );
    Ok(())
}
