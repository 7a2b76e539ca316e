//! The server's HTTP API from the client side: `GET /streams`, and `POST /ingest/{stream}` with an
//! Arrow IPC stream body encoded batch by batch as the upload goes.

use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use arrow::ipc::writer::{IpcWriteOptions, StreamWriter};
use arrowport_api::{ErrorBody, IngestReport};
use bytes::Bytes;
use futures::{Stream, StreamExt, TryStreamExt};
use reqwest::{Url, header};
use serde::de::DeserializeOwned;

use super::progress::Progress;
use super::tls::{self, Tls};
use super::{Error, root_cause};

/// A server, by its base URL.
pub struct HttpServer {
    /// As given, for messages.
    given: String,
    base: Url,
    client: reqwest::Client,
    /// `Bearer TOKEN`, sent with every request.
    authorization: Option<String>,
}

impl HttpServer {
    /// A server at `url` (`http://` or `https://`, verified with `tls`), sent `token` (if any) as
    /// `Authorization: Bearer`.
    pub fn new(url: &str, token: Option<&str>, tls: &Tls) -> Result<Self, Error> {
        let invalid = |message: String| Error::ServerUrl { url: url.to_owned(), message };
        let base = Url::parse(url).map_err(|error| invalid(error.to_string()))?;
        if !matches!(base.scheme(), "http" | "https") || base.cannot_be_a_base() {
            return Err(invalid("use http://HOST:PORT or https://HOST:PORT".to_owned()));
        }
        let mut client = reqwest::Client::builder();
        if let Some(ca) = &tls.ca {
            for certificate in reqwest::Certificate::from_pem_bundle(ca).map_err(|e| tls::invalid("--ca-file", e))? {
                client = client.add_root_certificate(certificate);
            }
        }
        if let Some((cert, key)) = &tls.identity {
            let pem = [cert.as_slice(), b"\n", key.as_slice()].concat();
            client = client.identity(reqwest::Identity::from_pem(&pem).map_err(|e| tls::invalid("--client-cert", e))?);
        }
        let client = client.build().map_err(|error| invalid(root_cause(&error)))?;
        let authorization = token.map(|token| format!("Bearer {token}"));
        Ok(Self { given: url.to_owned(), base, client, authorization })
    }

    fn request(&self, method: reqwest::Method, url: Url) -> reqwest::RequestBuilder {
        let request = self.client.request(method, url);
        match &self.authorization {
            Some(value) => request.header(header::AUTHORIZATION, value),
            None => request,
        }
    }

    /// `base` + `segments`, each percent-encoded (a stream name never escapes its path segment).
    fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.base.clone();
        url.path_segments_mut().expect("checked in new").pop_if_empty().extend(segments);
        url
    }

    /// `GET /streams`, as `T` (the JSON itself, or the report's types).
    pub async fn streams<T: DeserializeOwned>(&self) -> Result<T, Error> {
        let url = self.url(&["streams"]);
        let response =
            self.request(reqwest::Method::GET, url.clone()).send().await.map_err(|error| self.failed(&url, &error))?;
        answer(&url, response).await
    }

    /// Sends `batches` as one `POST /ingest/{stream}`: one transaction on the server, committed once
    /// the stream ends (dropping the future before aborts the request, and the server rolls it back).
    pub async fn ingest<S>(
        &self,
        stream: &str,
        schema: SchemaRef,
        options: IpcWriteOptions,
        batches: S,
        progress: Arc<Progress>,
    ) -> Result<IngestReport, Error>
    where
        S: Stream<Item = RecordBatch> + Send + 'static,
    {
        let writer = StreamWriter::try_new_with_options(Vec::new(), &schema, options)
            .map_err(|e| Error::Encode(e.to_string()))?;
        let body = ipc_body(writer, batches).inspect_ok(move |bytes| progress.sent(bytes.len()));
        let url = self.url(&["ingest", stream]);
        let response = self
            .request(reqwest::Method::POST, url.clone())
            .header(header::CONTENT_TYPE, "application/vnd.apache.arrow.stream")
            .body(reqwest::Body::wrap_stream(body))
            .send()
            .await
            .map_err(|error| self.failed(&url, &error))?;
        answer(&url, response).await
    }

    fn failed(&self, url: &Url, error: &reqwest::Error) -> Error {
        if error.is_connect() {
            Error::Unreachable { url: self.given.clone(), message: root_cause(error) }
        } else {
            Error::Protocol { url: url.to_string(), message: root_cause(error) }
        }
    }
}

/// The IPC stream: the schema goes out with the first batch, each batch as one chunk as soon as it is
/// encoded, the end-of-stream marker after the last batch.
fn ipc_body<S>(writer: StreamWriter<Vec<u8>>, batches: S) -> impl Stream<Item = std::io::Result<Bytes>>
where
    S: Stream<Item = RecordBatch> + Send + 'static,
{
    futures::stream::try_unfold(Some((writer, batches.boxed())), |state| async move {
        let Some((mut writer, mut batches)) = state else {
            return Ok(None);
        };
        let more = match batches.next().await {
            Some(batch) => {
                writer.write(&batch).map_err(std::io::Error::other)?;
                true
            }
            None => {
                writer.finish().map_err(std::io::Error::other)?;
                false
            }
        };
        let chunk = Bytes::from(std::mem::take(writer.get_mut()));
        Ok(Some((chunk, more.then_some((writer, batches)))))
    })
}

/// The JSON of a 2xx answer, or the server's `{"error": {"code", "message"}}` as [`Error::Refused`].
async fn answer<T: DeserializeOwned>(url: &Url, response: reqwest::Response) -> Result<T, Error> {
    let status = response.status();
    let protocol = |message: String| Error::Protocol { url: url.to_string(), message };
    let text = response.text().await.map_err(|error| protocol(root_cause(&error)))?;
    if status.is_success() {
        return serde_json::from_str(&text).map_err(|error| protocol(format!("{error} in {text:?}")));
    }
    match serde_json::from_str::<ErrorBody>(&text) {
        Ok(ErrorBody { error }) => {
            Err(Error::Refused { status: status.as_u16(), code: error.code, message: error.message })
        }
        Err(_) => Err(protocol(format!("HTTP {status}: {}", text.trim()))),
    }
}
