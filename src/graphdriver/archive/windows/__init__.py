"""Windows container layer tars (go-winio backuptar semantics), one job per module: ``names``
(keys, file and xattr names, ``fold``), ``metadata`` (PAX records <-> xattrs, the layer-root
files), ``layout`` (walking a stored layer), ``importer`` (apply), ``export`` (diff),
``defaults`` (the records of a file made on Linux), ``view`` (a stored layer as overlayfs lower
layers) and ``sandbox`` (a copy-on-write sandbox's diff as a Windows layer).
The archive package's rules hold: nothing here imports drivers/, store, cli, plugin or the
package root.


A Windows layer tar (what hcsshim's ``ociwclayer`` exports and imports, and what moby's
windowsfilter driver streams) is a PAX tar whose entries live under three top directories:
``Files/`` (the container's ``C:\\``), ``Hives/`` (registry deltas) and ``UtilityVM/Files/`` (the
utility VM image of base layers).  Windows metadata rides in PAX records:

- ``MSWINDOWS.fileattr``: the Win32 file attributes, decimal (``FILE_ATTRIBUTE_DIRECTORY`` = 16...);
- ``MSWINDOWS.rawsd``: the self-relative security descriptor, base64 (``MSWINDOWS.sd``: the legacy
  SDDL form);
- ``MSWINDOWS.mountpoint``: present on a symlink entry that is a junction (mount point);
- ``MSWINDOWS.xattr.<name>``: an NTFS extended attribute, base64;
- ``LIBARCHIVE.creationtime``: the creation time, ``sec[.nsec]``;
- ``mtime``/``atime``/``ctime``: Go writes them in PAX because Windows times have sub-second parts.

An alternate data stream of ``Files/a.txt`` is its own regular entry ``Files/a.txt:name`` right
after the file (the ``:$DATA`` suffix dropped).  Deleted files are ``.wh.NAME`` entries (whiteouts,
``Files/`` and ``UtilityVM/Files/`` only), second names of a file are hard-link entries.

How this module keeps that on a Linux filesystem (the windowsfilter driver's layer directory):

- every entry's Windows metadata is kept in ``user.mswindows.*`` extended attributes of the file:
  ``fileattr`` (decimal text), ``rawsd`` (the binary SD), ``sd`` (SDDL), ``mountpoint``,
  ``xattr.<name>`` (binary EA value), ``creationtime``, ``mtime``/``atime``/``ctime`` (the PAX
  strings verbatim) and ``pax.<key>`` for any other record, so ``diff`` writes every record back
  unchanged.  Linux refuses ``user.*`` xattrs on symlinks, so a symlink's metadata is kept in the
  sidecar ``linkmeta.json`` at the layer root instead.  A value the filesystem has no room for
  (ext4 keeps one block of xattrs per inode; NTFS allows 64 KiB security descriptors and EAs)
  is kept in ``winmeta/<sha256>`` at the layer root and named in ``user.mswindows.side``;
- an alternate data stream is a regular file named ``file:stream`` beside its file (Windows names
  cannot contain ``:``, so this never collides); ``user.mswindows.streamindex`` keeps its place
  among its file's streams, so ``diff`` writes them in the order they came;
- deletions are ``tombstones.txt`` in hcsshim's format: a UTF-8 BOM and ``Version 1.0``, then one
  ``\\path`` (relative to ``Files``, backslashes) per line;
- Windows names are case-insensitive: every path of an entry, whiteout or hard-link target is
  matched against the stored names regardless of case (``fold``), the stored spelling is kept.

A hard link to a parent layer's file (hcsshim links across layers) is a hard link to that
file's inode; ``crosslinks.json`` at the layer root remembers the name it was given so ``diff``
writes it back as a link.  A diff layer that touches ``UtilityVM`` starts from a clone of its
parent's utility VM (hard links; directories, symlinks and the BCD files copied), as hcsshim's
``initUtilityVM`` does.  The BCD files of an imported layer are also copied to ``bcd.bak``,
``bcd.log.bak``, ``bcd.log1.bak`` and ``bcd.log2.bak`` at the layer root.

``diff`` output order is hcsshim's exporter's: the top directories, and inside every directory the
names sorted bytewise, each directory followed by its alternate streams, then the whiteouts of its
tombstones, then its contents.  Mode bits are go-winio's: ``0o40000`` for directories,
``0o100000`` for files with data, ``0o120000`` for reparse points, ``0o644`` for hard links.
"""
