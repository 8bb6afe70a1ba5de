//! The host functions, grouped by ABI area, each group registered by its own function.
//! Statuses and enum values are those of the proxy-wasm ABI 0.2.1.

use wasmtime::{Caller, Extern, Linker, Memory, Result};

use crate::{HostState, LocalResponse, Metric};

const OK: u32 = 0;
const NOT_FOUND: u32 = 1;
const BAD_ARGUMENT: u32 = 2;
const CAS_MISMATCH: u32 = 8;

/// `MapType::HttpRequestHeaders`.
pub(crate) const REQUEST_HEADERS: u32 = 0;
const VM_CONFIGURATION: u32 = 6;
const PLUGIN_CONFIGURATION: u32 = 7;

/// Registers every host function the filter uses.
pub(crate) fn add_to_linker(linker: &mut Linker<HostState>) -> Result<()> {
    memory_calls::add(linker)?;
    headers::add(linker)?;
    buffers::add(linker)?;
    properties::add(linker)?;
    responses::add(linker)?;
    logging::add(linker)?;
    metrics::add(linker)?;
    time::add(linker)?;
    shared::add(linker)?;
    wasi::add(linker)?;
    Ok(())
}

type Ctx<'a> = Caller<'a, HostState>;

fn memory(caller: &mut Ctx<'_>) -> Result<Memory> {
    caller
        .get_export("memory")
        .and_then(Extern::into_memory)
        .ok_or_else(|| wasmtime::Error::msg("guest exports no memory"))
}

fn range(ptr: u32, len: u32) -> Result<std::ops::Range<usize>> {
    let start = ptr as usize;
    let end = start
        .checked_add(len as usize)
        .ok_or_else(|| wasmtime::Error::msg("guest pointer overflows"))?;
    Ok(start..end)
}

/// Reads guest memory, bounds-checked: a bad pointer traps the guest.
fn read(caller: &mut Ctx<'_>, ptr: u32, len: u32) -> Result<Vec<u8>> {
    let mem = memory(caller)?;
    mem.data(&caller)
        .get(range(ptr, len)?)
        .map(<[u8]>::to_vec)
        .ok_or_else(|| wasmtime::Error::msg(format!("guest read out of bounds: {ptr}+{len}")))
}

fn write(caller: &mut Ctx<'_>, ptr: u32, bytes: &[u8]) -> Result<()> {
    let mem = memory(caller)?;
    let len = u32::try_from(bytes.len())?;
    mem.data_mut(&mut *caller)
        .get_mut(range(ptr, len)?)
        .ok_or_else(|| wasmtime::Error::msg(format!("guest write out of bounds: {ptr}+{len}")))?
        .copy_from_slice(bytes);
    Ok(())
}

fn read_text(caller: &mut Ctx<'_>, ptr: u32, len: u32) -> Result<String> {
    Ok(String::from_utf8_lossy(&read(caller, ptr, len)?).into_owned())
}

/// Copies `bytes` into memory the guest allocates, and writes its address and size to the
/// guest's return slots, as every proxy-wasm "get" call does.
fn give(caller: &mut Ctx<'_>, bytes: &[u8], ret_ptr: u32, ret_len: u32) -> Result<()> {
    let len = u32::try_from(bytes.len())?;
    let allocate = caller
        .get_export("proxy_on_memory_allocate")
        .and_then(Extern::into_func)
        .ok_or_else(|| wasmtime::Error::msg("guest exports no proxy_on_memory_allocate"))?
        .typed::<u32, u32>(&caller)?;
    let ptr = allocate.call(&mut *caller, len)?;
    write(caller, ptr, bytes)?;
    write(caller, ret_ptr, &ptr.to_le_bytes())?;
    write(caller, ret_len, &len.to_le_bytes())
}

/// The proxy-wasm map encoding: count, then (key length, value length) pairs, then each
/// key and value followed by NUL.
pub(crate) fn serialize_map(pairs: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(pairs.len() as u32).to_le_bytes());
    for (k, v) in pairs {
        out.extend_from_slice(&(k.len() as u32).to_le_bytes());
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
    }
    for (k, v) in pairs {
        out.extend_from_slice(k.as_bytes());
        out.push(0);
        out.extend_from_slice(v);
        out.push(0);
    }
    out
}

/// The inverse of [`serialize_map`]; `None` for a malformed map.
pub(crate) fn deserialize_map(bytes: &[u8]) -> Option<Vec<(String, Vec<u8>)>> {
    let word = |at: usize| -> Option<usize> {
        Some(u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?) as usize)
    };
    if bytes.is_empty() {
        return Some(Vec::new());
    }
    let count = word(0)?;
    let mut sizes = Vec::with_capacity(count.min(1024));
    for i in 0..count {
        sizes.push((word(4 + i * 8)?, word(8 + i * 8)?));
    }
    let mut at = 4 + count * 8;
    let mut pairs = Vec::with_capacity(sizes.len());
    for (klen, vlen) in sizes {
        let key = bytes.get(at..at + klen)?;
        at += klen + 1;
        let value = bytes.get(at..at + vlen)?;
        at += vlen + 1;
        pairs.push((String::from_utf8_lossy(key).into_owned(), value.to_vec()));
    }
    Some(pairs)
}

mod memory_calls {
    use super::*;

    pub(super) fn add(linker: &mut Linker<HostState>) -> Result<()> {
        linker.func_wrap(
            "env",
            "proxy_set_effective_context",
            |_: Ctx<'_>, _ctx: u32| OK,
        )?;
        linker.func_wrap("env", "proxy_done", |_: Ctx<'_>| OK)?;
        linker.func_wrap("env", "proxy_continue_stream", |_: Ctx<'_>, _t: u32| OK)?;
        linker.func_wrap("env", "proxy_close_stream", |_: Ctx<'_>, _t: u32| OK)?;
        linker.func_wrap(
            "env",
            "proxy_set_tick_period_milliseconds",
            |_: Ctx<'_>, _ms: u32| OK,
        )?;
        linker.func_wrap(
            "env",
            "proxy_get_status",
            |_: Ctx<'_>, _a: u32, _b: u32, _c: u32| NOT_FOUND,
        )?;
        Ok(())
    }
}

mod headers {
    use super::*;

    fn map<'a>(caller: &'a mut Ctx<'_>, kind: u32) -> &'a mut Vec<(String, Vec<u8>)> {
        caller.data_mut().maps.entry(kind).or_default()
    }

    pub(super) fn add(linker: &mut Linker<HostState>) -> Result<()> {
        linker.func_wrap(
            "env",
            "proxy_get_header_map_pairs",
            |mut caller: Ctx<'_>, kind: u32, ret_ptr: u32, ret_len: u32| -> Result<u32> {
                let bytes = serialize_map(map(&mut caller, kind));
                give(&mut caller, &bytes, ret_ptr, ret_len)?;
                Ok(OK)
            },
        )?;
        linker.func_wrap(
            "env",
            "proxy_set_header_map_pairs",
            |mut caller: Ctx<'_>, kind: u32, ptr: u32, len: u32| -> Result<u32> {
                let bytes = read(&mut caller, ptr, len)?;
                let Some(pairs) = deserialize_map(&bytes) else {
                    return Ok(BAD_ARGUMENT);
                };
                *map(&mut caller, kind) = pairs;
                Ok(OK)
            },
        )?;
        linker.func_wrap(
            "env",
            "proxy_get_header_map_value",
            |mut caller: Ctx<'_>,
             kind: u32,
             kptr: u32,
             klen: u32,
             ret_ptr: u32,
             ret_len: u32|
             -> Result<u32> {
                let key = read_text(&mut caller, kptr, klen)?;
                let value = map(&mut caller, kind)
                    .iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case(&key))
                    .map(|(_, v)| v.clone());
                match value {
                    Some(value) => {
                        give(&mut caller, &value, ret_ptr, ret_len)?;
                        Ok(OK)
                    }
                    None => Ok(NOT_FOUND),
                }
            },
        )?;
        linker.func_wrap(
            "env",
            "proxy_replace_header_map_value",
            |mut caller: Ctx<'_>,
             kind: u32,
             kptr: u32,
             klen: u32,
             vptr: u32,
             vlen: u32|
             -> Result<u32> {
                let key = read_text(&mut caller, kptr, klen)?.to_ascii_lowercase();
                let value = read(&mut caller, vptr, vlen)?;
                let pairs = map(&mut caller, kind);
                pairs.retain(|(k, _)| !k.eq_ignore_ascii_case(&key));
                pairs.push((key, value));
                Ok(OK)
            },
        )?;
        linker.func_wrap(
            "env",
            "proxy_add_header_map_value",
            |mut caller: Ctx<'_>,
             kind: u32,
             kptr: u32,
             klen: u32,
             vptr: u32,
             vlen: u32|
             -> Result<u32> {
                let key = read_text(&mut caller, kptr, klen)?.to_ascii_lowercase();
                let value = read(&mut caller, vptr, vlen)?;
                map(&mut caller, kind).push((key, value));
                Ok(OK)
            },
        )?;
        linker.func_wrap(
            "env",
            "proxy_remove_header_map_value",
            |mut caller: Ctx<'_>, kind: u32, kptr: u32, klen: u32| -> Result<u32> {
                let key = read_text(&mut caller, kptr, klen)?;
                map(&mut caller, kind).retain(|(k, _)| !k.eq_ignore_ascii_case(&key));
                Ok(OK)
            },
        )?;
        Ok(())
    }
}

mod buffers {
    use super::*;

    pub(super) fn add(linker: &mut Linker<HostState>) -> Result<()> {
        linker.func_wrap(
            "env",
            "proxy_get_buffer_bytes",
            |mut caller: Ctx<'_>,
             kind: u32,
             start: u32,
             max: u32,
             ret_ptr: u32,
             ret_len: u32|
             -> Result<u32> {
                let buffer = match kind {
                    VM_CONFIGURATION => caller.data().vm_configuration.clone(),
                    PLUGIN_CONFIGURATION => caller.data().plugin_configuration.clone(),
                    _ => return Ok(NOT_FOUND),
                };
                let start = (start as usize).min(buffer.len());
                let end = start.saturating_add(max as usize).min(buffer.len());
                if start == end {
                    return Ok(NOT_FOUND);
                }
                give(&mut caller, &buffer[start..end], ret_ptr, ret_len)?;
                Ok(OK)
            },
        )?;
        linker.func_wrap(
            "env",
            "proxy_set_buffer_bytes",
            |_: Ctx<'_>, _k: u32, _s: u32, _m: u32, _p: u32, _l: u32| BAD_ARGUMENT,
        )?;
        Ok(())
    }
}

mod properties {
    use super::*;

    pub(super) fn add(linker: &mut Linker<HostState>) -> Result<()> {
        linker.func_wrap(
            "env",
            "proxy_get_property",
            |mut caller: Ctx<'_>,
             pptr: u32,
             plen: u32,
             ret_ptr: u32,
             ret_len: u32|
             -> Result<u32> {
                let path = read(&mut caller, pptr, plen)?;
                match caller.data().properties.get(&path).cloned() {
                    Some(value) => {
                        give(&mut caller, &value, ret_ptr, ret_len)?;
                        Ok(OK)
                    }
                    None => Ok(NOT_FOUND),
                }
            },
        )?;
        linker.func_wrap(
            "env",
            "proxy_set_property",
            |mut caller: Ctx<'_>, pptr: u32, plen: u32, vptr: u32, vlen: u32| -> Result<u32> {
                let mut path = read(&mut caller, pptr, plen)?;
                // The SDK ends each part with NUL; keep the key without the last one.
                if path.last() == Some(&0) {
                    path.pop();
                }
                let value = read(&mut caller, vptr, vlen)?;
                caller.data_mut().properties.insert(path, value);
                Ok(OK)
            },
        )?;
        Ok(())
    }
}

mod responses {
    use super::*;

    pub(super) fn add(linker: &mut Linker<HostState>) -> Result<()> {
        linker.func_wrap(
            "env",
            "proxy_send_local_response",
            |mut caller: Ctx<'_>,
             status: u32,
             _dptr: u32,
             _dlen: u32,
             bptr: u32,
             blen: u32,
             hptr: u32,
             hlen: u32,
             _grpc: i32|
             -> Result<u32> {
                let body = read(&mut caller, bptr, blen)?;
                let raw = read(&mut caller, hptr, hlen)?;
                let Some(pairs) = deserialize_map(&raw) else {
                    return Ok(BAD_ARGUMENT);
                };
                let headers = pairs
                    .into_iter()
                    .map(|(k, v)| (k, String::from_utf8_lossy(&v).into_owned()))
                    .collect();
                caller.data_mut().local_response = Some(LocalResponse {
                    status,
                    headers,
                    body,
                });
                Ok(OK)
            },
        )?;
        Ok(())
    }
}

mod logging {
    use super::*;

    pub(super) fn add(linker: &mut Linker<HostState>) -> Result<()> {
        linker.func_wrap(
            "env",
            "proxy_log",
            |mut caller: Ctx<'_>, level: u32, ptr: u32, len: u32| -> Result<u32> {
                let message = read_text(&mut caller, ptr, len)?;
                caller.data_mut().logs.push((level, message));
                Ok(OK)
            },
        )?;
        linker.func_wrap(
            "env",
            "proxy_get_log_level",
            |mut caller: Ctx<'_>, ret: u32| -> Result<u32> {
                write(&mut caller, ret, &0u32.to_le_bytes())?;
                Ok(OK)
            },
        )?;
        Ok(())
    }
}

mod metrics {
    use super::*;

    fn metric<'a>(caller: &'a mut Ctx<'_>, id: u32) -> Option<&'a mut Metric> {
        caller.data_mut().metrics.get_mut(id as usize)
    }

    pub(super) fn add(linker: &mut Linker<HostState>) -> Result<()> {
        linker.func_wrap(
            "env",
            "proxy_define_metric",
            |mut caller: Ctx<'_>, kind: u32, nptr: u32, nlen: u32, ret: u32| -> Result<u32> {
                if kind > 2 {
                    return Ok(BAD_ARGUMENT);
                }
                let name = read_text(&mut caller, nptr, nlen)?;
                let metrics = &mut caller.data_mut().metrics;
                let id = match metrics.iter().position(|m| m.name == name) {
                    Some(id) => id,
                    None => {
                        metrics.push(Metric {
                            name,
                            kind,
                            value: 0,
                        });
                        metrics.len() - 1
                    }
                };
                write(&mut caller, ret, &u32::try_from(id)?.to_le_bytes())?;
                Ok(OK)
            },
        )?;
        linker.func_wrap(
            "env",
            "proxy_increment_metric",
            |mut caller: Ctx<'_>, id: u32, offset: i64| -> u32 {
                match metric(&mut caller, id) {
                    Some(m) => {
                        m.value = m.value.saturating_add_signed(offset);
                        OK
                    }
                    None => NOT_FOUND,
                }
            },
        )?;
        linker.func_wrap(
            "env",
            "proxy_record_metric",
            |mut caller: Ctx<'_>, id: u32, value: u64| -> u32 {
                match metric(&mut caller, id) {
                    Some(m) => {
                        m.value = value;
                        OK
                    }
                    None => NOT_FOUND,
                }
            },
        )?;
        linker.func_wrap(
            "env",
            "proxy_get_metric",
            |mut caller: Ctx<'_>, id: u32, ret: u32| -> Result<u32> {
                let Some(value) = metric(&mut caller, id).map(|m| m.value) else {
                    return Ok(NOT_FOUND);
                };
                write(&mut caller, ret, &value.to_le_bytes())?;
                Ok(OK)
            },
        )?;
        Ok(())
    }
}

mod time {
    use super::*;

    pub(super) fn add(linker: &mut Linker<HostState>) -> Result<()> {
        linker.func_wrap(
            "env",
            "proxy_get_current_time_nanoseconds",
            |mut caller: Ctx<'_>, ret: u32| -> Result<u32> {
                let now = caller.data().now_nanos;
                write(&mut caller, ret, &now.to_le_bytes())?;
                Ok(OK)
            },
        )?;
        Ok(())
    }
}

mod shared {
    use super::*;

    pub(super) fn add(linker: &mut Linker<HostState>) -> Result<()> {
        linker.func_wrap(
            "env",
            "proxy_get_shared_data",
            |mut caller: Ctx<'_>,
             kptr: u32,
             klen: u32,
             ret_ptr: u32,
             ret_len: u32,
             ret_cas: u32|
             -> Result<u32> {
                let key = read_text(&mut caller, kptr, klen)?;
                let found = caller
                    .data()
                    .shared
                    .0
                    .lock()
                    .map_err(|_| wasmtime::Error::msg("shared data lock poisoned"))?
                    .get(&key)
                    .cloned();
                let Some((value, cas)) = found else {
                    return Ok(NOT_FOUND);
                };
                give(&mut caller, &value, ret_ptr, ret_len)?;
                write(&mut caller, ret_cas, &cas.to_le_bytes())?;
                Ok(OK)
            },
        )?;
        linker.func_wrap(
            "env",
            "proxy_set_shared_data",
            |mut caller: Ctx<'_>,
             kptr: u32,
             klen: u32,
             vptr: u32,
             vlen: u32,
             cas: u32|
             -> Result<u32> {
                let key = read_text(&mut caller, kptr, klen)?;
                let value = read(&mut caller, vptr, vlen)?;
                let shared = caller.data().shared.clone();
                let mut map = shared
                    .0
                    .lock()
                    .map_err(|_| wasmtime::Error::msg("shared data lock poisoned"))?;
                let current = map.get(&key).map_or(0, |(_, c)| *c);
                if cas != 0 && cas != current {
                    return Ok(CAS_MISMATCH);
                }
                map.insert(key, (value, current.wrapping_add(1).max(1)));
                Ok(OK)
            },
        )?;
        Ok(())
    }
}

/// The WASI preview1 calls Rust's std makes on wasm32-wasip1.
mod wasi {
    use super::*;

    const ERRNO_SUCCESS: u32 = 0;
    const ERRNO_BADF: u32 = 8;

    fn environment(caller: &Ctx<'_>) -> Vec<Vec<u8>> {
        caller
            .data()
            .environment
            .iter()
            .map(|(k, v)| format!("{k}={v}\0").into_bytes())
            .collect()
    }

    pub(super) fn add(linker: &mut Linker<HostState>) -> Result<()> {
        const M: &str = "wasi_snapshot_preview1";
        linker.func_wrap(
            M,
            "environ_sizes_get",
            |mut caller: Ctx<'_>, count_ptr: u32, size_ptr: u32| -> Result<u32> {
                let vars = environment(&caller);
                let size: usize = vars.iter().map(Vec::len).sum();
                write(
                    &mut caller,
                    count_ptr,
                    &u32::try_from(vars.len())?.to_le_bytes(),
                )?;
                write(&mut caller, size_ptr, &u32::try_from(size)?.to_le_bytes())?;
                Ok(ERRNO_SUCCESS)
            },
        )?;
        linker.func_wrap(
            M,
            "environ_get",
            |mut caller: Ctx<'_>, list_ptr: u32, buf_ptr: u32| -> Result<u32> {
                let mut at = buf_ptr;
                for (i, var) in environment(&caller).iter().enumerate() {
                    write(
                        &mut caller,
                        list_ptr + 4 * u32::try_from(i)?,
                        &at.to_le_bytes(),
                    )?;
                    write(&mut caller, at, var)?;
                    at += u32::try_from(var.len())?;
                }
                Ok(ERRNO_SUCCESS)
            },
        )?;
        linker.func_wrap(
            M,
            "random_get",
            |mut caller: Ctx<'_>, ptr: u32, len: u32| -> Result<u32> {
                // xorshift64*: the filter only seeds hash maps with it.
                let mut bytes = Vec::with_capacity(len as usize);
                let state = &mut caller.data_mut().random_state;
                while bytes.len() < len as usize {
                    *state ^= *state >> 12;
                    *state ^= *state << 25;
                    *state ^= *state >> 27;
                    bytes.extend_from_slice(
                        &state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes(),
                    );
                }
                bytes.truncate(len as usize);
                write(&mut caller, ptr, &bytes)?;
                Ok(ERRNO_SUCCESS)
            },
        )?;
        linker.func_wrap(
            M,
            "fd_write",
            |mut caller: Ctx<'_>,
             fd: u32,
             iovs: u32,
             iovs_len: u32,
             written_ptr: u32|
             -> Result<u32> {
                if fd != 1 && fd != 2 {
                    return Ok(ERRNO_BADF);
                }
                let mut text = Vec::new();
                for i in 0..iovs_len {
                    let iov = read(&mut caller, iovs + 8 * i, 8)?;
                    let ptr = u32::from_le_bytes([iov[0], iov[1], iov[2], iov[3]]);
                    let len = u32::from_le_bytes([iov[4], iov[5], iov[6], iov[7]]);
                    text.extend(read(&mut caller, ptr, len)?);
                }
                write(
                    &mut caller,
                    written_ptr,
                    &u32::try_from(text.len())?.to_le_bytes(),
                )?;
                let message = String::from_utf8_lossy(&text).into_owned();
                caller.data_mut().logs.push((2, message));
                Ok(ERRNO_SUCCESS)
            },
        )?;
        linker.func_wrap(M, "proc_exit", |_: Ctx<'_>, code: u32| -> Result<()> {
            wasmtime::bail!("guest called proc_exit({code})")
        })?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The byte layout the proxy-wasm Rust SDK itself uses for `[("a", "1"), ("bb", "")]`.
    const SDK_MAP: &[u8] = &[
        2, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, b'a', 0, b'1', 0, b'b', b'b',
        0, 0,
    ];

    #[test]
    fn header_map_encoding_matches_the_sdk_byte_for_byte() {
        let pairs = vec![
            ("a".to_owned(), b"1".to_vec()),
            ("bb".to_owned(), Vec::new()),
        ];
        assert_eq!(serialize_map(&pairs), SDK_MAP);
        assert_eq!(deserialize_map(SDK_MAP), Some(pairs));
        assert_eq!(deserialize_map(&SDK_MAP[..10]), None);
    }
}
