//! Extended attributes of files, read and written without following a
//! final symlink: `images` keeps file capabilities and the other xattrs a
//! layer tar records.
#![allow(unsafe_code)]

use std::io;
use std::path::Path;

/// Sets extended attribute `name` on `path` without following a final
/// symlink (`lsetxattr`). Used by `images` to keep file capabilities and
/// other xattrs recorded in layer tars.
pub fn set_xattr_nofollow(path: &Path, name: &str, value: &[u8]) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let name =
        std::ffi::CString::new(name).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: both pointers are NUL-terminated strings that outlive the
    // call; `value` is valid for `value.len()` bytes.
    let rc = unsafe {
        libc::lsetxattr(
            path.as_ptr(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Reads extended attribute `name` of `path` without following a final
/// symlink (`lgetxattr`); `None` when it is not set.
pub fn get_xattr_nofollow(path: &Path, name: &str) -> io::Result<Option<Vec<u8>>> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let name =
        std::ffi::CString::new(name).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut buf = vec![0u8; 64 * 1024];
    // SAFETY: both strings are NUL-terminated and outlive the call; `buf`
    // is writable for `buf.len()` bytes.
    let n = unsafe {
        libc::lgetxattr(
            path.as_ptr(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if n < 0 {
        let err = io::Error::last_os_error();
        return if err.raw_os_error() == Some(libc::ENODATA) {
            Ok(None)
        } else {
            Err(err)
        };
    }
    buf.truncate(n as usize);
    Ok(Some(buf))
}
