//! glibc malloc settings for a process that relays bytes.
//!
//! russh allocates a buffer per SSH packet (up to 32 KiB) and frees it a
//! moment later. With glibc's defaults the freed space at the top of the heap
//! is handed back to the kernel as soon as it passes 128 KiB, and the next
//! packet faults fresh zeroed pages back in: measured at about 7% of the
//! pivot's CPU while relaying. Keeping a few MiB of slack removes that.

/// Applies the settings; call before any other thread starts.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn tune() {
    const MIB: libc::c_int = 1 << 20;
    // SAFETY: mallopt only changes allocator parameters. main calls it right
    // after parsing arguments, before the runtime or any other thread exists.
    unsafe {
        // A fixed threshold also turns off glibc's dynamic one, which would
        // otherwise move the trim threshold back down.
        libc::mallopt(libc::M_MMAP_THRESHOLD, MIB);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 8 * MIB);
        libc::mallopt(libc::M_TOP_PAD, MIB);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn tune() {}
