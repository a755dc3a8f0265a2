/* Vulkan layer VK_LAYER_fake_semfd: lets SAPIEN 2.2.x create a device on Mesa's lavapipe.
 *
 * SAPIEN 2.2.x always enables the device extension VK_KHR_external_semaphore_fd (for CUDA interop),
 * which lavapipe does not implement, so vkCreateDevice fails with VK_ERROR_EXTENSION_NOT_PRESENT.
 * This layer
 *   - adds VK_KHR_external_semaphore_fd to vkEnumerateDeviceExtensionProperties' answer,
 *   - removes it from VkDeviceCreateInfo::ppEnabledExtensionNames before calling down the chain,
 *   - answers vkGetSemaphoreFdKHR / vkImportSemaphoreFdKHR with functions that fail cleanly.
 * Everything else goes straight to the next layer / driver. Rendering on the CPU never uses the
 * extension (SAPIEN only calls it when sharing images with CUDA).
 *
 * Built by tools/cpu_render/setup_cpu_render.sh (`make render`):  gcc -shared -fPIC -O2 -o libVkLayer_fake_semfd.so vk_layer_fake_semfd.c
 * Enabled with VK_LAYER_PATH=<dir of VkLayer_fake_semfd.json> VK_INSTANCE_LAYERS=VK_LAYER_fake_semfd.
 * Loader interface: version 2 (vkNegotiateLoaderLayerInterfaceVersion), plus the exported
 * vkGetInstanceProcAddr / vkGetDeviceProcAddr for loaders that predate negotiation.
 */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <vulkan/vk_layer.h>
#include <vulkan/vulkan.h>

#define LAYER_NAME "VK_LAYER_fake_semfd"
#define FAKE_EXT VK_KHR_EXTERNAL_SEMAPHORE_FD_EXTENSION_NAME
#define EXPORT __attribute__((visibility("default")))

/* Dispatchable handles start with the loader's dispatch table pointer; an instance and its physical
 * devices share one, as do a device and its queues / command buffers. That pointer is the map key. */
typedef void *dkey_t;
static dkey_t key_of(const void *handle) { return *(dkey_t *)handle; }

struct instance_rec {
    dkey_t key;
    VkInstance instance;
    PFN_vkGetInstanceProcAddr gipa;
    PFN_vkDestroyInstance destroy;
    PFN_vkEnumerateDeviceExtensionProperties enum_dev_ext;
    struct instance_rec *next;
};

struct device_rec {
    dkey_t key;
    PFN_vkGetDeviceProcAddr gdpa;
    PFN_vkDestroyDevice destroy;
    struct device_rec *next;
};

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static struct instance_rec *instances;
static struct device_rec *devices;

static struct instance_rec *find_instance(dkey_t key) {
    pthread_mutex_lock(&lock);
    struct instance_rec *r = instances;
    while (r && r->key != key) r = r->next;
    pthread_mutex_unlock(&lock);
    return r;
}

static struct device_rec *find_device(dkey_t key) {
    pthread_mutex_lock(&lock);
    struct device_rec *r = devices;
    while (r && r->key != key) r = r->next;
    pthread_mutex_unlock(&lock);
    return r;
}

/* The loader's link info in a create-info pNext chain (sType given, function VK_LAYER_LINK_INFO). */
static void *link_info(const void *pnext, VkStructureType stype) {
    for (const VkBaseInStructure *s = pnext; s; s = s->pNext) {
        if (s->sType != stype) continue;
        if (stype == VK_STRUCTURE_TYPE_LOADER_INSTANCE_CREATE_INFO &&
            ((const VkLayerInstanceCreateInfo *)s)->function == VK_LAYER_LINK_INFO)
            return (void *)s;
        if (stype == VK_STRUCTURE_TYPE_LOADER_DEVICE_CREATE_INFO &&
            ((const VkLayerDeviceCreateInfo *)s)->function == VK_LAYER_LINK_INFO)
            return (void *)s;
    }
    return NULL;
}

static VKAPI_ATTR VkResult VKAPI_CALL layer_CreateInstance(const VkInstanceCreateInfo *info,
                                                           const VkAllocationCallbacks *alloc, VkInstance *out) {
    VkLayerInstanceCreateInfo *link = link_info(info->pNext, VK_STRUCTURE_TYPE_LOADER_INSTANCE_CREATE_INFO);
    if (!link || !link->u.pLayerInfo) return VK_ERROR_INITIALIZATION_FAILED;
    PFN_vkGetInstanceProcAddr gipa = link->u.pLayerInfo->pfnNextGetInstanceProcAddr;
    PFN_vkCreateInstance create = (PFN_vkCreateInstance)gipa(VK_NULL_HANDLE, "vkCreateInstance");
    if (!create) return VK_ERROR_INITIALIZATION_FAILED;
    link->u.pLayerInfo = link->u.pLayerInfo->pNext; /* the next layer reads its own link */
    VkResult res = create(info, alloc, out);
    if (res != VK_SUCCESS) return res;
    struct instance_rec *r = calloc(1, sizeof *r);
    if (!r) return VK_ERROR_OUT_OF_HOST_MEMORY;
    r->key = key_of(*out);
    r->instance = *out;
    r->gipa = gipa;
    r->destroy = (PFN_vkDestroyInstance)gipa(*out, "vkDestroyInstance");
    r->enum_dev_ext = (PFN_vkEnumerateDeviceExtensionProperties)gipa(*out, "vkEnumerateDeviceExtensionProperties");
    pthread_mutex_lock(&lock);
    r->next = instances;
    instances = r;
    pthread_mutex_unlock(&lock);
    return VK_SUCCESS;
}

static VKAPI_ATTR void VKAPI_CALL layer_DestroyInstance(VkInstance instance, const VkAllocationCallbacks *alloc) {
    if (!instance) return;
    dkey_t key = key_of(instance);
    struct instance_rec *found = NULL;
    pthread_mutex_lock(&lock);
    for (struct instance_rec **p = &instances; *p; p = &(*p)->next) {
        if ((*p)->key == key) {
            found = *p;
            *p = found->next;
            break;
        }
    }
    pthread_mutex_unlock(&lock);
    if (found) {
        if (found->destroy) found->destroy(instance, alloc);
        free(found);
    }
}

static VKAPI_ATTR VkResult VKAPI_CALL layer_EnumerateDeviceExtensionProperties(
    VkPhysicalDevice gpu, const char *layer, uint32_t *count, VkExtensionProperties *props) {
    static const VkExtensionProperties fake = {FAKE_EXT, VK_KHR_EXTERNAL_SEMAPHORE_FD_SPEC_VERSION};
    if (layer && strcmp(layer, LAYER_NAME) == 0) { /* this layer's own extensions */
        if (!props) { *count = 1; return VK_SUCCESS; }
        if (*count < 1) return VK_INCOMPLETE;
        props[0] = fake;
        *count = 1;
        return VK_SUCCESS;
    }
    struct instance_rec *r = find_instance(key_of(gpu));
    if (!r || !r->enum_dev_ext) return VK_ERROR_INITIALIZATION_FAILED;
    if (layer) return r->enum_dev_ext(gpu, layer, count, props); /* another layer's question */

    uint32_t n = 0;
    VkResult res = r->enum_dev_ext(gpu, NULL, &n, NULL);
    if (res != VK_SUCCESS) return res;
    VkExtensionProperties *all = calloc(n + 1, sizeof *all);
    if (!all) return VK_ERROR_OUT_OF_HOST_MEMORY;
    res = r->enum_dev_ext(gpu, NULL, &n, all);
    if (res != VK_SUCCESS && res != VK_INCOMPLETE) { free(all); return res; }
    int present = 0;
    for (uint32_t i = 0; i < n; i++) present |= strcmp(all[i].extensionName, FAKE_EXT) == 0;
    if (!present) all[n++] = fake;
    if (!props) {
        *count = n;
        res = VK_SUCCESS;
    } else {
        uint32_t k = *count < n ? *count : n;
        memcpy(props, all, k * sizeof *all);
        *count = k;
        res = k < n ? VK_INCOMPLETE : VK_SUCCESS;
    }
    free(all);
    return res;
}

static VKAPI_ATTR VkResult VKAPI_CALL layer_CreateDevice(VkPhysicalDevice gpu, const VkDeviceCreateInfo *info,
                                                         const VkAllocationCallbacks *alloc, VkDevice *out) {
    VkLayerDeviceCreateInfo *link = link_info(info->pNext, VK_STRUCTURE_TYPE_LOADER_DEVICE_CREATE_INFO);
    struct instance_rec *inst = find_instance(key_of(gpu));
    if (!link || !link->u.pLayerInfo || !inst) return VK_ERROR_INITIALIZATION_FAILED;
    PFN_vkGetInstanceProcAddr gipa = link->u.pLayerInfo->pfnNextGetInstanceProcAddr;
    PFN_vkGetDeviceProcAddr gdpa = link->u.pLayerInfo->pfnNextGetDeviceProcAddr;
    PFN_vkCreateDevice create = (PFN_vkCreateDevice)gipa(inst->instance, "vkCreateDevice");
    if (!create) return VK_ERROR_INITIALIZATION_FAILED;
    link->u.pLayerInfo = link->u.pLayerInfo->pNext;

    /* Does the driver below really lack the extension? Then strip it from the request. */
    uint32_t n = 0;
    int native = 0;
    if (inst->enum_dev_ext && inst->enum_dev_ext(gpu, NULL, &n, NULL) == VK_SUCCESS && n) {
        VkExtensionProperties *all = calloc(n, sizeof *all);
        if (all && inst->enum_dev_ext(gpu, NULL, &n, all) >= VK_SUCCESS)
            for (uint32_t i = 0; i < n; i++) native |= strcmp(all[i].extensionName, FAKE_EXT) == 0;
        free(all);
    }
    VkDeviceCreateInfo copy = *info;
    const char **names = NULL;
    if (!native && info->enabledExtensionCount) {
        names = calloc(info->enabledExtensionCount, sizeof *names);
        if (!names) return VK_ERROR_OUT_OF_HOST_MEMORY;
        uint32_t k = 0;
        for (uint32_t i = 0; i < info->enabledExtensionCount; i++)
            if (strcmp(info->ppEnabledExtensionNames[i], FAKE_EXT) != 0) names[k++] = info->ppEnabledExtensionNames[i];
        copy.enabledExtensionCount = k;
        copy.ppEnabledExtensionNames = names;
    }
    VkResult res = create(gpu, &copy, alloc, out);
    free(names);
    if (res != VK_SUCCESS) return res;
    struct device_rec *r = calloc(1, sizeof *r);
    if (!r) return VK_ERROR_OUT_OF_HOST_MEMORY;
    r->key = key_of(*out);
    r->gdpa = gdpa;
    r->destroy = (PFN_vkDestroyDevice)gdpa(*out, "vkDestroyDevice");
    pthread_mutex_lock(&lock);
    r->next = devices;
    devices = r;
    pthread_mutex_unlock(&lock);
    return VK_SUCCESS;
}

static VKAPI_ATTR void VKAPI_CALL layer_DestroyDevice(VkDevice device, const VkAllocationCallbacks *alloc) {
    if (!device) return;
    dkey_t key = key_of(device);
    struct device_rec *found = NULL;
    pthread_mutex_lock(&lock);
    for (struct device_rec **p = &devices; *p; p = &(*p)->next) {
        if ((*p)->key == key) {
            found = *p;
            *p = found->next;
            break;
        }
    }
    pthread_mutex_unlock(&lock);
    if (found) {
        if (found->destroy) found->destroy(device, alloc);
        free(found);
    }
}

/* The faked extension's commands: there is nothing to export or import, so they fail cleanly. */
static VKAPI_ATTR VkResult VKAPI_CALL layer_GetSemaphoreFdKHR(VkDevice d, const VkSemaphoreGetFdInfoKHR *i, int *fd) {
    (void)d; (void)i;
    if (fd) *fd = -1;
    return VK_ERROR_OUT_OF_HOST_MEMORY;
}

static VKAPI_ATTR VkResult VKAPI_CALL layer_ImportSemaphoreFdKHR(VkDevice d, const VkImportSemaphoreFdInfoKHR *i) {
    (void)d; (void)i;
    return VK_ERROR_INVALID_EXTERNAL_HANDLE;
}

EXPORT VKAPI_ATTR PFN_vkVoidFunction VKAPI_CALL vkGetDeviceProcAddr(VkDevice device, const char *name);

static PFN_vkVoidFunction device_hook(const char *name) {
    if (!strcmp(name, "vkGetDeviceProcAddr")) return (PFN_vkVoidFunction)vkGetDeviceProcAddr;
    if (!strcmp(name, "vkDestroyDevice")) return (PFN_vkVoidFunction)layer_DestroyDevice;
    if (!strcmp(name, "vkGetSemaphoreFdKHR")) return (PFN_vkVoidFunction)layer_GetSemaphoreFdKHR;
    if (!strcmp(name, "vkImportSemaphoreFdKHR")) return (PFN_vkVoidFunction)layer_ImportSemaphoreFdKHR;
    return NULL;
}

EXPORT VKAPI_ATTR PFN_vkVoidFunction VKAPI_CALL vkGetDeviceProcAddr(VkDevice device, const char *name) {
    PFN_vkVoidFunction f = device_hook(name);
    if (f || !device) return f;
    struct device_rec *r = find_device(key_of(device));
    return r ? r->gdpa(device, name) : NULL;
}

EXPORT VKAPI_ATTR PFN_vkVoidFunction VKAPI_CALL vkGetInstanceProcAddr(VkInstance instance, const char *name) {
    if (!strcmp(name, "vkGetInstanceProcAddr")) return (PFN_vkVoidFunction)vkGetInstanceProcAddr;
    if (!strcmp(name, "vkCreateInstance")) return (PFN_vkVoidFunction)layer_CreateInstance;
    if (!strcmp(name, "vkDestroyInstance")) return (PFN_vkVoidFunction)layer_DestroyInstance;
    if (!strcmp(name, "vkEnumerateDeviceExtensionProperties"))
        return (PFN_vkVoidFunction)layer_EnumerateDeviceExtensionProperties;
    if (!strcmp(name, "vkCreateDevice")) return (PFN_vkVoidFunction)layer_CreateDevice;
    PFN_vkVoidFunction f = device_hook(name);
    if (f || !instance) return f;
    struct instance_rec *r = find_instance(key_of(instance));
    return r ? r->gipa(instance, name) : NULL;
}

EXPORT VKAPI_ATTR VkResult VKAPI_CALL vkNegotiateLoaderLayerInterfaceVersion(VkNegotiateLayerInterface *v) {
    if (!v || v->sType != LAYER_NEGOTIATE_INTERFACE_STRUCT) return VK_ERROR_INITIALIZATION_FAILED;
    if (v->loaderLayerInterfaceVersion > 2) v->loaderLayerInterfaceVersion = 2;
    if (v->loaderLayerInterfaceVersion >= 2) {
        v->pfnGetInstanceProcAddr = vkGetInstanceProcAddr;
        v->pfnGetDeviceProcAddr = vkGetDeviceProcAddr;
        v->pfnGetPhysicalDeviceProcAddr = NULL;
    }
    return VK_SUCCESS;
}
