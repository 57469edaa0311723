/* hostrelay: the per-domain IOVA -> GPA mapping table.
 *
 * One table per virtio-iommu domain.  A mapping is the closed interval
 * [start, end] of IOVAs created by one MAP request (virtio v1.2+ "5.13.6.6
 * UNMAP request": "a mapping [is] a virtual region created with a single MAP
 * request"), plus the guest-physical start and the MAP flags.  Mappings never
 * overlap, so ordering by start also orders by end, which is what lets every
 * query below be one or two O(log n) descents.
 *
 * Ends are inclusive everywhere, exactly as on the wire: the whole 64-bit
 * space is [0, UINT64_MAX] and its size (2^64) is never computed.
 *
 * The table is a B+ tree whose nodes are malloc'd by the table itself; it
 * holds no Python objects, so a C virtqueue walker can drive it directly.
 * Not thread-safe: the caller serialises requests (virtio processes a queue
 * in order anyway).  Every function returns >= 0 on success and -errno on
 * failure, like hr_vfio.
 */
#ifndef HR_TABLE_H
#define HR_TABLE_H

#include <stddef.h>
#include <stdint.h>

typedef struct hr_table hr_table;

/* One mapping as seen from outside the table. */
struct hr_mapping {
	uint64_t start; /* first IOVA */
	uint64_t end;   /* last IOVA (inclusive) */
	uint64_t phys;  /* GPA of start */
	uint32_t flags; /* VIRTIO_IOMMU_MAP_F_* */
};

/* A flag bit the table's owner may set on insert for its own use.  The
 * table keeps it but never exports it (a struct hr_mapping never has it);
 * only hr_table_mark_flags returns it.  The data plane sets it on a mapping
 * it knows the kernel holds as one entry of one RAM piece (hr_fanout.c). */
#define HR_TABLE_F_NOTE (1u << 31)

/* A new empty table, or NULL when out of memory. */
hr_table *hr_table_new(void);
/* Free the table and every node; NULL is fine. */
void hr_table_free(hr_table *t);
/* Remove every mapping. */
void hr_table_clear(hr_table *t);
/* Number of live mappings. */
uint64_t hr_table_count(const hr_table *t);

/* Insert [start, end] -> phys.  -EINVAL if start > end, -EEXIST if any live
 * mapping intersects the interval (nothing changes), -ENOMEM. */
int hr_table_insert(hr_table *t, uint64_t start, uint64_t end, uint64_t phys,
                    uint32_t flags);
/* 1 if any live mapping intersects [start, end], else 0 (-EINVAL if
 * start > end). */
int hr_table_overlaps(const hr_table *t, uint64_t start, uint64_t end);
/* 1 and *out filled if a mapping contains addr, else 0. */
int hr_table_lookup(const hr_table *t, uint64_t addr, struct hr_mapping *out);
/* 1 and *out filled with the mapping of lowest start >= from, else 0.
 * Iterate with from = previous end + 1 (stop after end == UINT64_MAX). */
int hr_table_next(const hr_table *t, uint64_t from, struct hr_mapping *out);
/* Copy up to cap mappings with start >= from, in order; returns how many. */
size_t hr_table_dump(const hr_table *t, uint64_t from, struct hr_mapping *out,
                     size_t cap);

/* UNMAP rules (5.13.6.6): -ERANGE if a mapping intersecting [start, end] is
 * not entirely inside it; otherwise the number of mappings it covers (holes
 * are fine).  Changes nothing. */
int64_t hr_table_check_range(const hr_table *t, uint64_t start, uint64_t end);
/* Atomic UNMAP: -ERANGE and nothing removed if a mapping is straddled,
 * otherwise removes every covered mapping and returns how many. */
int64_t hr_table_remove_range(hr_table *t, uint64_t start, uint64_t end);
/* 1 (and *out filled, if given) if a mapping is exactly [start, end], else 0. */
int hr_table_find_exact(const hr_table *t, uint64_t start, uint64_t end, struct hr_mapping *out);
/* hr_table_find_exact, also remembering where the mapping is, so that a
 * following hr_table_remove_exact of it (with no other change to the table
 * in between) needs no second descent: the relay's UNMAP finds the mapping,
 * asks the kernel, then removes it. */
int hr_table_find_mark(hr_table *t, uint64_t start, uint64_t end, struct hr_mapping *out);
/* hr_table_find_mark, giving back only the mapping's flags with
 * HR_TABLE_F_NOTE as inserted, or -1 if no mapping is exactly [start, end]. */
int64_t hr_table_mark_flags(hr_table *t, uint64_t start, uint64_t end);
/* hr_table_remove_exact of the mapping hr_table_find_mark has just found
 * (it returned 1, and nothing changed the table since): 1. */
int hr_table_remove_marked(hr_table *t);
/* Remove the mapping that is exactly [start, end]: 1 if removed, else 0. */
int hr_table_remove_exact(hr_table *t, uint64_t start, uint64_t end);

/* Translate the span [iova, iova + size - 1] for an access needing the MAP
 * flags in `need` (READ and/or WRITE).  The span may cross adjacent mappings
 * only if they are also contiguous in GPA.  Returns 0 and *gpa, or
 * -ENOENT (address not mapped), -EACCES (permission missing) or
 * -EXDEV (next mapping not GPA-contiguous), with *fault_addr set to the first
 * IOVA that failed; -EINVAL if size is 0 or the span wraps. */
int hr_table_translate(const hr_table *t, uint64_t iova, uint64_t size,
                       uint32_t need, uint64_t *gpa, uint64_t *fault_addr);

#endif
