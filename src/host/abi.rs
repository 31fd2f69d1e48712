//! Non-panicking access to the proxy-wasm ABI calls this filter makes on live streams.
//!
//! The SDK's `hostcalls::` wrappers `panic!` on any status they do not expect, and a panic aborts
//! the VM for every stream on that worker. Envoy legitimately answers some calls with
//! `BadArgument` or `NotFound` (a header map that is no longer available, a body buffer that is not
//! exposed, a stream already gone), so these wrappers return the status instead. Only calls whose
//! bookkeeping lives inside the SDK (HTTP callouts, context switching) still go through it.

use proxy_wasm::types::{BufferType, MapType, Status, StreamType};
use std::ptr::null_mut;

#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_get_header_map_value(
        map_type: MapType,
        key_data: *const u8,
        key_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
    ) -> Status;
    fn proxy_replace_header_map_value(
        map_type: MapType,
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
    ) -> Status;
    fn proxy_remove_header_map_value(map_type: MapType, key_data: *const u8, key_size: usize) -> Status;
    fn proxy_continue_stream(stream_type: StreamType) -> Status;
    fn proxy_send_local_response(
        status_code: u32,
        status_code_details_data: *const u8,
        status_code_details_size: usize,
        body_data: *const u8,
        body_size: usize,
        headers_data: *const u8,
        headers_size: usize,
        grpc_status: i32,
    ) -> Status;
    fn proxy_close_stream(stream_type: StreamType) -> Status;
    fn proxy_get_header_map_pairs(
        map_type: MapType,
        return_data: *mut *mut u8,
        return_size: *mut usize,
    ) -> Status;
    fn proxy_set_buffer_bytes(
        buffer_type: BufferType,
        start: usize,
        size: usize,
        buffer_data: *const u8,
        buffer_size: usize,
    ) -> Status;
    fn proxy_get_buffer_bytes(
        buffer_type: BufferType,
        start: usize,
        max_size: usize,
        return_buffer_data: *mut *mut u8,
        return_buffer_size: *mut usize,
    ) -> Status;
    fn proxy_get_shared_data(
        key_data: *const u8,
        key_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
        return_cas: *mut u32,
    ) -> Status;
    fn proxy_set_shared_data(
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
        cas: u32,
    ) -> Status;
    fn proxy_enqueue_shared_queue(queue_id: u32, value_data: *const u8, value_size: usize) -> Status;
    fn proxy_dequeue_shared_queue(
        queue_id: u32,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
    ) -> Status;
    fn proxy_increment_metric(metric_id: u32, offset: i64) -> Status;
    fn proxy_get_metric(metric_id: u32, return_value: *mut u64) -> Status;
    fn proxy_record_metric(metric_id: u32, value: u64) -> Status;
    fn proxy_set_tick_period_milliseconds(period: u32) -> Status;
    fn proxy_get_property(
        path_data: *const u8,
        path_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
    ) -> Status;
    fn proxy_set_property(
        path_data: *const u8,
        path_size: usize,
        value_data: *const u8,
        value_size: usize,
    ) -> Status;
}

fn check(status: Status) -> Result<(), Status> {
    match status {
        Status::Ok => Ok(()),
        other => Err(other),
    }
}

/// Takes ownership of a buffer the host allocated through the SDK's exported allocator.
///
/// # Safety
/// `data`/`size` must come from a successful host call that returns an allocated buffer.
unsafe fn owned(data: *mut u8, size: usize) -> Vec<u8> {
    if data.is_null() {
        Vec::new()
    } else {
        Vec::from_raw_parts(data, size, size)
    }
}

/// One header's value as bytes (`Ok(None)` when absent). Bytes, because a client may send values
/// that are not UTF-8 and the SDK's string getters panic on them.
pub fn header(map: MapType, name: &str) -> Result<Option<Vec<u8>>, Status> {
    let mut data: *mut u8 = null_mut();
    let mut size: usize = 0;
    // SAFETY: the host writes an allocated buffer to data/size on Ok.
    match unsafe { proxy_get_header_map_value(map, name.as_ptr(), name.len(), &mut data, &mut size) } {
        Status::Ok => Ok(Some(unsafe { owned(data, size) })),
        Status::NotFound => Ok(None),
        other => Err(other),
    }
}

/// Every header of a map in one host call (each data-returning call costs a VM round trip for
/// the allocation, so one call for all headers is much cheaper than one per header). Names are
/// lowercase ASCII from Envoy's codecs; values stay bytes.
pub fn headers(map: MapType) -> Result<Vec<(String, Vec<u8>)>, Status> {
    let mut data: *mut u8 = null_mut();
    let mut size: usize = 0;
    // SAFETY: the host writes an allocated buffer to data/size on Ok.
    match unsafe { proxy_get_header_map_pairs(map, &mut data, &mut size) } {
        Status::Ok => Ok(parse_header_map(&unsafe { owned(data, size) })),
        Status::NotFound => Ok(Vec::new()),
        other => Err(other),
    }
}

/// The proxy-wasm header-map wire format (see `serialize_headers`); malformed input gives what
/// could be read, never a panic.
fn parse_header_map(bytes: &[u8]) -> Vec<(String, Vec<u8>)> {
    let word = |at: usize| -> Option<usize> {
        let b: [u8; 4] = bytes.get(at..at + 4)?.try_into().ok()?;
        usize::try_from(u32::from_le_bytes(b)).ok()
    };
    let mut out = Vec::new();
    let Some(count) = word(0) else {
        return out;
    };
    let mut data = 4 + count.saturating_mul(8);
    for i in 0..count {
        let (Some(klen), Some(vlen)) = (word(4 + i * 8), word(8 + i * 8)) else {
            break;
        };
        let key = bytes.get(data..data + klen);
        let value = bytes.get(data + klen + 1..data + klen + 1 + vlen);
        let (Some(key), Some(value)) = (key, value) else {
            break;
        };
        if let Ok(key) = std::str::from_utf8(key) {
            out.push((key.to_string(), value.to_vec()));
        }
        data += klen + vlen + 2;
    }
    out
}

/// The first value of `name` among `headers` (the engine reads headers itself; this is for the
/// test-only fault injection).
#[cfg(feature = "fault-injection")]
pub fn find<'a>(headers: &'a [(String, Vec<u8>)], name: &str) -> Option<&'a [u8]> {
    headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_slice())
}

pub fn set_header(map: MapType, name: &str, value: &[u8]) -> Result<(), Status> {
    // SAFETY: pointers are valid for the given lengths for the duration of the call.
    check(unsafe {
        proxy_replace_header_map_value(map, name.as_ptr(), name.len(), value.as_ptr(), value.len())
    })
}

pub fn remove_header(map: MapType, name: &str) -> Result<(), Status> {
    // SAFETY: pointer valid for the given length for the duration of the call.
    check(unsafe { proxy_remove_header_map_value(map, name.as_ptr(), name.len()) })
}

pub fn resume_request() -> Result<(), Status> {
    // SAFETY: plain call without pointers.
    check(unsafe { proxy_continue_stream(StreamType::HttpRequest) })
}

pub fn resume_response() -> Result<(), Status> {
    // SAFETY: plain call without pointers.
    check(unsafe { proxy_continue_stream(StreamType::HttpResponse) })
}

/// Ends the stream from the filter (both directions are reset; the upstream request is released).
pub fn close_response() -> Result<(), Status> {
    // SAFETY: plain call without pointers.
    check(unsafe { proxy_close_stream(StreamType::HttpResponse) })
}

/// Replaces the whole current chunk of a response body with `value`.
pub fn replace_body(size: usize, value: &[u8]) -> Result<(), Status> {
    // SAFETY: pointer valid for its length for the duration of the call.
    check(unsafe {
        proxy_set_buffer_bytes(BufferType::HttpResponseBody, 0, size, value.as_ptr(), value.len())
    })
}

/// Appends `value` to the response body Envoy holds for this stream. Envoy only exposes that
/// buffer while the filter is holding the body (its last body callback returned `Pause`);
/// otherwise this fails with `BadArgument`.
pub fn append_body(value: &[u8]) -> Result<(), Status> {
    // A start past the end means "append" to Envoy.
    let start = i32::MAX as usize;
    // SAFETY: pointer valid for its length for the duration of the call.
    check(unsafe {
        proxy_set_buffer_bytes(BufferType::HttpResponseBody, start, 0, value.as_ptr(), value.len())
    })
}

/// The proxy-wasm header-map wire format: count, (key len, value len) pairs, then NUL-terminated
/// keys and values.
fn serialize_headers(headers: &[(&str, &str)]) -> Vec<u8> {
    let len = |n: usize| u32::try_from(n).unwrap_or(u32::MAX).to_le_bytes();
    let mut out = Vec::new();
    out.extend_from_slice(&len(headers.len()));
    for (k, v) in headers {
        out.extend_from_slice(&len(k.len()));
        out.extend_from_slice(&len(v.len()));
    }
    for (k, v) in headers {
        out.extend_from_slice(k.as_bytes());
        out.push(0);
        out.extend_from_slice(v.as_bytes());
        out.push(0);
    }
    out
}

/// A local reply: Envoy answers the client itself and the request goes no further. `details`
/// becomes the request's `%RESPONSE_CODE_DETAILS%` (the template's access log prints the query
/// of requests whose details say the filter saw them).
pub fn send_response(
    status: u32,
    details: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<(), Status> {
    let map = serialize_headers(headers);
    // SAFETY: pointers valid for their lengths for the duration of the call.
    check(unsafe {
        proxy_send_local_response(
            status,
            details.as_ptr(),
            details.len(),
            body.as_ptr(),
            body.len(),
            map.as_ptr(),
            map.len(),
            -1,
        )
    })
}

/// A shared-data value and its CAS token (`(None, None)` when absent).
pub fn get_shared_data(key: &str) -> Result<(Option<Vec<u8>>, Option<u32>), Status> {
    let mut data: *mut u8 = null_mut();
    let mut size: usize = 0;
    let mut cas: u32 = 0;
    // SAFETY: the host writes an allocated buffer to data/size on Ok.
    match unsafe { proxy_get_shared_data(key.as_ptr(), key.len(), &mut data, &mut size, &mut cas) } {
        Status::Ok => {
            let value = (!data.is_null()).then(|| unsafe { owned(data, size) });
            Ok((value, (cas != 0).then_some(cas)))
        }
        Status::NotFound => Ok((None, None)),
        other => Err(other),
    }
}

/// Writes a shared-data value; with `cas`, only if the key is unchanged since it was read.
pub fn set_shared_data(key: &str, value: &[u8], cas: Option<u32>) -> Result<(), Status> {
    // SAFETY: pointers valid for their lengths for the duration of the call.
    check(unsafe {
        proxy_set_shared_data(key.as_ptr(), key.len(), value.as_ptr(), value.len(), cas.unwrap_or(0))
    })
}

pub fn enqueue(queue: u32, value: &[u8]) -> Result<(), Status> {
    // SAFETY: pointer valid for its length for the duration of the call.
    check(unsafe { proxy_enqueue_shared_queue(queue, value.as_ptr(), value.len()) })
}

/// The next message of a queue (`Ok(None)` when it is empty).
pub fn dequeue(queue: u32) -> Result<Option<Vec<u8>>, Status> {
    let mut data: *mut u8 = null_mut();
    let mut size: usize = 0;
    // SAFETY: the host writes an allocated buffer to data/size on Ok.
    match unsafe { proxy_dequeue_shared_queue(queue, &mut data, &mut size) } {
        Status::Ok => Ok(Some(unsafe { owned(data, size) })),
        Status::Empty => Ok(None),
        other => Err(other),
    }
}

pub fn increment_metric(id: u32, offset: i64) -> Result<(), Status> {
    // SAFETY: plain call without pointers.
    check(unsafe { proxy_increment_metric(id, offset) })
}

/// A metric's current value (for a counter: the Envoy-wide total).
pub fn get_metric(id: u32) -> Result<u64, Status> {
    let mut value: u64 = 0;
    // SAFETY: the host writes a u64 to the pointer on Ok.
    check(unsafe { proxy_get_metric(id, &mut value) }).map(|()| value)
}

pub fn record_metric(id: u32, value: u64) -> Result<(), Status> {
    // SAFETY: plain call without pointers.
    check(unsafe { proxy_record_metric(id, value) })
}

pub fn set_tick_period_ms(ms: u64) -> Result<(), Status> {
    // SAFETY: plain call without pointers.
    check(unsafe { proxy_set_tick_period_milliseconds(u32::try_from(ms).unwrap_or(u32::MAX)) })
}

/// A property path as the host reads it: the parts separated by NUL bytes.
fn property_path(path: &[&str]) -> Vec<u8> {
    path.join("\0").into_bytes()
}

/// A host property (`["source", "address"]`: the downstream address), `Ok(None)` when absent.
pub fn property(path: &[&str]) -> Result<Option<Vec<u8>>, Status> {
    let path = property_path(path);
    let mut data: *mut u8 = null_mut();
    let mut size: usize = 0;
    // SAFETY: the host writes an allocated buffer to data/size on Ok.
    match unsafe { proxy_get_property(path.as_ptr(), path.len(), &mut data, &mut size) } {
        Status::Ok => Ok((!data.is_null()).then(|| unsafe { owned(data, size) })),
        Status::NotFound => Ok(None),
        other => Err(other),
    }
}

/// Sets a property of the stream (Envoy keeps it in the stream's filter state as `wasm.<name>`,
/// where an access log can print it).
pub fn set_property(path: &[&str], value: &[u8]) -> Result<(), Status> {
    let path = property_path(path);
    // SAFETY: pointers valid for their lengths for the duration of the call.
    check(unsafe { proxy_set_property(path.as_ptr(), path.len(), value.as_ptr(), value.len()) })
}

/// Up to `max` bytes of a buffer (empty when the host has none).
pub fn buffer(kind: BufferType, max: usize) -> Result<Vec<u8>, Status> {
    buffer_at(kind, 0, max)
}

/// Up to `max` bytes of a buffer from offset `start`.
pub fn buffer_at(kind: BufferType, start: usize, max: usize) -> Result<Vec<u8>, Status> {
    if max == 0 {
        return Ok(Vec::new());
    }
    let mut data: *mut u8 = null_mut();
    let mut size: usize = 0;
    // SAFETY: the host writes an allocated buffer to data/size on Ok.
    match unsafe { proxy_get_buffer_bytes(kind, start, max, &mut data, &mut size) } {
        Status::Ok => Ok(unsafe { owned(data, size) }),
        Status::NotFound => Ok(Vec::new()),
        other => Err(other),
    }
}

/// A webhook answer, read from the host: `:status` (none when there were no headers) and at most
/// `max_body` bytes of the body (one more than a verdict may be, so that an oversized one is
/// recognised).
pub fn call_answer(num_headers: usize, body_size: usize, max_body: usize) -> (Option<u32>, Vec<u8>) {
    let status = if num_headers == 0 {
        None
    } else {
        header(MapType::HttpCallResponseHeaders, ":status")
            .ok()
            .flatten()
            .and_then(|s| std::str::from_utf8(&s).ok()?.parse::<u32>().ok())
    };
    let body = buffer(BufferType::HttpCallResponseBody, body_size.min(max_body)).unwrap_or_default();
    (status, body)
}
