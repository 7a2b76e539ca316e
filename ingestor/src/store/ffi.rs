//! The one place Arrowport calls DuckDB's C API directly.
//!
//! DuckDB's fastest way to take Arrow data is `duckdb_arrow_scan`: it wraps an `ArrowArrayStream` in a
//! view that a plain `INSERT ... SELECT` reads with all cores. duckdb-rs does not expose it (nor its raw
//! connection handle), so this module owns the raw database handle, hands out duckdb-rs connections for
//! SQL (each holding the handle open), and keeps one raw connection per loader for registering streams.
//!
//! In DuckDB 1.5.5 that view is a persistent one (`CreateView(name, replace, temporary = false)`), in the
//! registering connection's default catalog, so every connection could list and scan it. A temporary view
//! (visible to its connection only) cannot be had through the C API: the `temp` catalog takes only
//! temporary entries and `USE temp` is refused, and a view created inside the load's transaction would
//! make that transaction write to two databases, which DuckDB refuses. So the views live in an in-memory
//! catalog of their own that client queries may not name or list (`crate::query::check_references`), and each
//! stream serves one scan at a time (`ScanPrivate::inner`).
#![allow(unsafe_code)]

use std::ffi::{CStr, CString, c_char, c_int};
use std::path::Path;
use std::ptr;
use std::sync::{Arc, Mutex};

use arrow::array::RecordBatchReader;
use arrow::datatypes::SchemaRef;
use arrow::ffi::FFI_ArrowSchema;
use arrow::ffi_stream::FFI_ArrowArrayStream;
use libduckdb_sys as sys;

/// The raw DuckDB database, shared in an `Arc`: every connection made from it holds a clone, so the
/// handle is closed only after its last connection is gone, and [`Database::reopen`](super::Database::reopen)
/// can tell when an instance is closed for good (no strong reference left).
pub struct RawDatabase {
    db: sys::duckdb_database,
}

// SAFETY: a duckdb_database is a thread-safe handle to a DuckDB instance; DuckDB synchronises internally.
unsafe impl Send for RawDatabase {}
// SAFETY: as above; `connect` may be called from any thread.
unsafe impl Sync for RawDatabase {}

impl RawDatabase {
    /// Opens (or creates) the database file.
    pub fn open(path: &Path) -> Result<Arc<Self>, String> {
        let c_path = CString::new(path.to_string_lossy().as_bytes()).map_err(|e| e.to_string())?;
        let mut db: sys::duckdb_database = ptr::null_mut();
        let mut error: *mut c_char = ptr::null_mut();
        // SAFETY: valid C string, out-pointers to locals; a null config means defaults.
        let state = unsafe { sys::duckdb_open_ext(c_path.as_ptr(), &mut db, ptr::null_mut(), &mut error) };
        if state != sys::duckdb_state_DuckDBSuccess {
            let message = take_c_error(error).unwrap_or_else(|| "unknown error".to_owned());
            return Err(message);
        }
        Ok(Arc::new(Self { db }))
    }

    /// A duckdb-rs connection for ordinary SQL.
    pub fn connect(self: &Arc<Self>) -> duckdb::Result<Connection> {
        // SAFETY: `self.db` stays open while the connection lives: the connection holds `self`.
        let conn = unsafe { duckdb::Connection::open_from_raw(self.db) }?;
        Ok(Connection { conn, db: self.clone() })
    }

    /// A raw connection whose default catalog is `catalog`.
    pub fn connection_in(self: &Arc<Self>, catalog: &str) -> Result<RawConnection, String> {
        let connection = self.raw_connection()?;
        connection.execute(&format!("USE {}", super::sql::ident(catalog)))?;
        Ok(connection)
    }

    /// A raw connection in the default catalog.
    fn raw_connection(self: &Arc<Self>) -> Result<RawConnection, String> {
        let mut con: sys::duckdb_connection = ptr::null_mut();
        // SAFETY: `self.db` is open; out-pointer to a local.
        if unsafe { sys::duckdb_connect(self.db, &mut con) } != sys::duckdb_state_DuckDBSuccess {
            return Err("cannot open a DuckDB connection".to_owned());
        }
        Ok(RawConnection { con, _db: self.clone() })
    }
}

impl Drop for RawDatabase {
    fn drop(&mut self) {
        // SAFETY: we own the handle, and every connection made from it is gone: each held an `Arc` of us.
        unsafe { sys::duckdb_close(&mut self.db) };
    }
}

/// A duckdb-rs connection (it derefs to one) that keeps its database open for as long as it lives.
pub struct Connection {
    // Declared first: the connection closes before its hold on the database is released.
    conn: duckdb::Connection,
    db: Arc<RawDatabase>,
}

impl Connection {
    /// Whether this connection belongs to `database`.
    pub fn is_on(&self, database: &Arc<RawDatabase>) -> bool {
        Arc::ptr_eq(&self.db, database)
    }
}

impl std::ops::Deref for Connection {
    type Target = duckdb::Connection;

    fn deref(&self) -> &duckdb::Connection {
        &self.conn
    }
}

/// A raw connection: registers Arrow streams as views in its default catalog, and classifies statements.
pub struct RawConnection {
    con: sys::duckdb_connection,
    /// Keeps the database open until this connection is disconnected (in `drop`, before fields drop).
    _db: Arc<RawDatabase>,
}

// SAFETY: a DuckDB connection may move between threads; it is used by one thread at a time (`&mut`/owned).
unsafe impl Send for RawConnection {}

impl RawConnection {
    fn execute(&self, sql: &str) -> Result<(), String> {
        let c_sql = CString::new(sql).map_err(|e| e.to_string())?;
        // SAFETY: an all-zero duckdb_result is the documented initial state; it is destroyed below.
        let mut result: sys::duckdb_result = unsafe { std::mem::zeroed() };
        // SAFETY: open connection, valid C string, out-pointer to a local.
        let state = unsafe { sys::duckdb_query(self.con, c_sql.as_ptr(), &mut result) };
        let outcome = if state == sys::duckdb_state_DuckDBSuccess {
            Ok(())
        } else {
            // SAFETY: the result is valid until destroyed; the message is copied before that.
            let message = unsafe { sys::duckdb_result_error(&mut result) };
            Err(copy_c_str(message).unwrap_or_else(|| format!("query failed: {sql}")))
        };
        // SAFETY: destroys the result filled in above, exactly once.
        unsafe { sys::duckdb_destroy_result(&mut result) };
        outcome
    }

    /// Whether `sql` is one statement that only reads (`SELECT`, `WITH`, `VALUES`, `DESCRIBE`, `SHOW`, …);
    /// nothing is executed. duckdb-rs does not expose a prepared statement's type, hence the raw calls.
    /// Errors are DuckDB's parse and bind messages.
    pub fn is_read_only(&self, sql: &str) -> Result<bool, String> {
        let c_sql = CString::new(sql).map_err(|_| "the query contains a NUL byte".to_owned())?;
        let mut statement: sys::duckdb_prepared_statement = ptr::null_mut();
        // SAFETY: open connection, valid C string, out-pointer to a local; destroyed below in all cases.
        let state = unsafe { sys::duckdb_prepare(self.con, c_sql.as_ptr(), &mut statement) };
        let outcome = if state == sys::duckdb_state_DuckDBSuccess {
            // SAFETY: a successfully prepared statement.
            let kind = unsafe { sys::duckdb_prepared_statement_type(statement) };
            Ok(kind == sys::duckdb_statement_type_DUCKDB_STATEMENT_TYPE_SELECT)
        } else {
            // SAFETY: the statement carries the error until destroyed; the message is copied first.
            let message = unsafe { sys::duckdb_prepare_error(statement) };
            Err(copy_c_str(message).unwrap_or_else(|| "the query could not be prepared".to_owned()))
        };
        // SAFETY: destroys the statement from duckdb_prepare (also after a failure), exactly once.
        unsafe { sys::duckdb_destroy_prepare(&mut statement) };
        outcome
    }

    /// Registers `reader` as view `view` (in this connection's default catalog). The returned stream must
    /// outlive every query that reads the view; drop it only after dropping the view.
    pub fn register(&self, view: &str, reader: Box<dyn RecordBatchReader + Send>) -> Result<ScanStream, String> {
        let mut stream = ScanStream::new(reader)?;
        let c_view = CString::new(view).map_err(|e| e.to_string())?;
        let raw: *mut FFI_ArrowArrayStream = &mut *stream.0;
        // SAFETY: the stream is boxed (stable address) and outlives the view, as documented above.
        let state = unsafe { sys::duckdb_arrow_scan(self.con, c_view.as_ptr(), raw as sys::duckdb_arrow_stream) };
        if state != sys::duckdb_state_DuckDBSuccess {
            return Err(format!("DuckDB refused to scan the Arrow stream as view {view}"));
        }
        Ok(stream)
    }
}

impl Drop for RawConnection {
    fn drop(&mut self) {
        // SAFETY: we own the connection and disconnect it once.
        unsafe { sys::duckdb_disconnect(&mut self.con) };
    }
}

/// An `ArrowArrayStream` for DuckDB that hands out borrowed copies of one schema.
///
/// DuckDB's `duckdb_arrow_scan` never releases the schemas it gets from `get_schema`, so a plain
/// arrow-rs stream (which exports a fresh schema per call) would leak on every request. Here the schema
/// is exported once, owned by the stream, and each copy's `release` only marks the copy released.
pub struct ScanStream(Box<FFI_ArrowArrayStream>);

struct ScanPrivate {
    /// Locked by each `get_next`: DuckDB serialises the calls of one scan, and nothing but the upload's
    /// own INSERT can scan the view (client queries are refused any other catalog, see `query.rs`), but
    /// were a second scan to start, it would get an error, never a data race on the stream.
    inner: Mutex<FFI_ArrowArrayStream>,
    schema: FFI_ArrowSchema,
}

/// `get_next`'s answer while another scan holds the stream (errno's EBUSY).
const BUSY: c_int = 16;

impl ScanStream {
    fn new(reader: Box<dyn RecordBatchReader + Send>) -> Result<Self, String> {
        let schema: SchemaRef = reader.schema();
        let schema = FFI_ArrowSchema::try_from(schema.as_ref()).map_err(|e| e.to_string())?;
        let private = Box::new(ScanPrivate { inner: Mutex::new(FFI_ArrowArrayStream::new(reader)), schema });
        Ok(Self(Box::new(FFI_ArrowArrayStream {
            get_schema: Some(scan_get_schema),
            get_next: Some(scan_get_next),
            get_last_error: Some(scan_get_last_error),
            release: Some(scan_release),
            private_data: Box::into_raw(private).cast(),
        })))
    }
}

unsafe extern "C" fn scan_get_schema(stream: *mut FFI_ArrowArrayStream, out: *mut FFI_ArrowSchema) -> c_int {
    // SAFETY: DuckDB passes the stream we built (or a bitwise copy sharing its private data) and a
    // writable out-pointer; the copy borrows buffers that live as long as the stream.
    unsafe {
        let private = &*((*stream).private_data as *const ScanPrivate);
        let mut copy = ptr::read(&private.schema);
        copy.release = Some(release_borrowed_schema);
        ptr::write(out, copy);
    }
    0
}

unsafe extern "C" fn release_borrowed_schema(schema: *mut FFI_ArrowSchema) {
    // SAFETY: marks a borrowed copy released; the owned schema is released with the stream.
    unsafe { (*schema).release = None };
}

unsafe extern "C" fn scan_get_next(stream: *mut FFI_ArrowArrayStream, out: *mut arrow::ffi::FFI_ArrowArray) -> c_int {
    // SAFETY: private data is ours and lives until release; the mutex gives one caller at a time the
    // inner stream.
    unsafe {
        let private = &*((*stream).private_data as *const ScanPrivate);
        let Ok(mut inner) = private.inner.try_lock() else { return BUSY };
        let get_next = inner.get_next.expect("arrow-rs streams have get_next");
        get_next(&mut *inner, out)
    }
}

unsafe extern "C" fn scan_get_last_error(stream: *mut FFI_ArrowArrayStream) -> *const c_char {
    // SAFETY: as in scan_get_next.
    unsafe {
        let private = &*((*stream).private_data as *const ScanPrivate);
        let Ok(mut inner) = private.inner.try_lock() else {
            return c"the stream is being read by another scan".as_ptr();
        };
        let get_last_error = inner.get_last_error.expect("arrow-rs streams have get_last_error");
        get_last_error(&mut *inner)
    }
}

unsafe extern "C" fn scan_release(stream: *mut FFI_ArrowArrayStream) {
    // SAFETY: called once, by our own Drop (DuckDB never releases streams passed to duckdb_arrow_scan).
    unsafe {
        drop(Box::from_raw((*stream).private_data as *mut ScanPrivate));
        (*stream).private_data = ptr::null_mut();
        (*stream).release = None;
    }
}

fn copy_c_str(message: *const c_char) -> Option<String> {
    // SAFETY: DuckDB returns null or a valid NUL-terminated string.
    (!message.is_null()).then(|| unsafe { CStr::from_ptr(message) }.to_string_lossy().into_owned())
}

fn take_c_error(error: *mut c_char) -> Option<String> {
    let message = copy_c_str(error);
    if !error.is_null() {
        // SAFETY: duckdb_open_ext allocates the message with duckdb_malloc; we free it once.
        unsafe { sys::duckdb_free(error.cast()) };
    }
    message
}
